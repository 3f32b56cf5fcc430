"""Past one GPU on Ray: `phi3v batch --ray` (Ray Data, ray_batch.py) and `phi3v serve --replicas` (Ray Serve,
ray_serve.py). Ray is imported only when these run (extra `phi3v[ray]`)."""
