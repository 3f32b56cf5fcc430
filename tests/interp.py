"""Run a script under Triton's CPU interpreter (TRITON_INTERPRET=1) in a subprocess: the interpreter
must be chosen before triton is imported.

Triton 3.6's interpreter turns a loop bound into an int with `int(array)`, which numpy >= 2.3
refuses for the 1-element arrays it uses as scalars; the prelude reads the element instead. It also
fixes the interpreter's float -> fp8 and fp32 -> bf16 rounding, its bf16 tl.dot and its bf16 arithmetic (see
PRELUDE).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PRELUDE = r"""
import numpy as _np
import triton.runtime.interpreter as _ti
_orig_patch = _ti._patch_lang_tensor
def _patch(tensor, scope):
    _orig_patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(_np.asarray(self.handle.data).reshape(-1)[0]))
_ti._patch_lang_tensor = _patch

# Its float -> fp8 e4m3 downcast neither carries a rounded-up mantissa into the exponent (1.98 becomes
# 1.0) nor rounds ties to even; the GPU's conversion does both. Downcast through torch's cast instead.
import torch as _torch
import triton.language as _tl
_orig_fp_to_fp = _ti.InterpreterBuilder.create_fp_to_fp
def _fp_to_fp(self, src, dst_type, rounding_mode):
    if dst_type.scalar != _tl.float8e4nv:
        return _orig_fp_to_fp(self, src, dst_type, rounding_mode)
    f32 = src.data if src.dtype.scalar == _tl.float32 else \
        _ti._convert_float(src.data, src.dtype.scalar, _tl.float32, None).view(_np.float32)  # exact upcast
    out = _torch.from_numpy(_np.ascontiguousarray(f32)).to(_torch.float8_e4m3fn).view(_torch.uint8).numpy()
    return _ti.TensorHandle(out, dst_type.scalar)
_ti.InterpreterBuilder.create_fp_to_fp = _fp_to_fp

# tl.dot multiplies bf16 operands as their stored uint16 bits; widen them to fp32 first (exact: bf16 is fp32's top
# half), as the tensor cores do.
_orig_dot = _ti.InterpreterBuilder.create_dot
def _dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    def wide(x):
        if x.dtype.scalar != _tl.bfloat16:
            return x
        return _ti.TensorHandle((x.data.astype(_np.uint32) << 16).view(_np.float32), _tl.float32)
    return _orig_dot(self, wide(a), wide(b), d, input_precision, max_num_imprecise_acc)
_ti.InterpreterBuilder.create_dot = _dot

# Float arithmetic on bf16 operands likewise works on the stored bits; widen to fp32, compute, round to nearest even.
_FLOAT_OPS = (_np.add, _np.subtract, _np.multiply, _np.divide, _np.maximum, _np.minimum, _np.fmax, _np.fmin)
_orig_binary = _ti.InterpreterBuilder.binary_op
def _binary(self, lhs, rhs, op):
    if lhs.dtype.scalar != _tl.bfloat16 or op not in _FLOAT_OPS:
        return _orig_binary(self, lhs, rhs, op)
    wide = lambda x: (x.data.astype(_np.uint32) << 16).view(_np.float32)
    f32 = _np.ascontiguousarray(op(wide(lhs), wide(rhs)), dtype=_np.float32)
    return _ti.TensorHandle(_torch.from_numpy(f32).to(_torch.bfloat16).view(_torch.uint16).numpy(), _tl.bfloat16)
_ti.InterpreterBuilder.binary_op = _binary

# Its fp32 -> bf16 cast truncates the mantissa; the GPU's (and torch's) rounds to nearest even.
_orig_trunc = _ti.InterpreterBuilder.create_fp_trunc
def _fp_trunc(self, src, dst_type):
    if dst_type.scalar != _tl.bfloat16 or src.dtype.scalar != _tl.float32:
        return _orig_trunc(self, src, dst_type)
    f32 = _np.ascontiguousarray(src.data, dtype=_np.float32)
    return _ti.TensorHandle(_torch.from_numpy(f32).to(_torch.bfloat16).view(_torch.uint16).numpy(), _tl.bfloat16)
_ti.InterpreterBuilder.create_fp_trunc = _fp_trunc
"""


def run_interpreted(script: str, timeout: int = 600) -> str:
    """Run `script` with the interpreter; assert it exits 0 and return its stdout."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", PRELUDE + script], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout
