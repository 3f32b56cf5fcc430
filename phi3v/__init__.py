"""phi3v: fast, faithful local inference for Phi-3-vision-128k-instruct and Phi-3.5-vision-instruct."""

from phi3v.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "Completion"]
__version__ = "0.1.0"


def __getattr__(name: str):  # the API pulls in the model code: import it on first use
    if name in ("LLM", "Completion"):
        from phi3v import api

        return getattr(api, name)
    raise AttributeError(name)
