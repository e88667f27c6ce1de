"""``ptv2 serve``: prefix runs trained separately on one backbone, stacked into one prefix bank and
served over HTTP; concurrent requests of any mix of tasks run through the backbone as one batch (each
row reads its task's bank entry through ``prefix_index``), then through each task's head.

- :mod:`.bank`: loading and stacking the runs, one mixed batch through the backbone and the heads;
- :mod:`.requests`: what a request may hold, checked before it joins a batch;
- :mod:`.batcher`: dynamic batching of concurrent requests;
- :mod:`.metrics`: the Prometheus metrics;
- :mod:`.app`: the HTTP endpoints and the server;
- :mod:`.options`: the command line;
- :mod:`.client`: a small asyncio HTTP client (tests, the load benchmark);
- :mod:`.testing`: saved runs without training (tests, the load benchmark).

Nothing here is imported by ``import ptv2_kernels``; the HTTP packages are the ``serve`` extra.
"""
