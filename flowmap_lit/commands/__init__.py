"""Every command of ``python -m flowmap_lit COMMAND`` (``flowmap_lit.cli`` lists them), one module each:

- ``train``: ``fit``, ``validate``, ``test``, ``predict`` (LightningCLI, a config per run);
- ``sample``: sample grids and ``.npz`` files from a checkpoint, at any step counts;
- ``evaluate``: FID, FD_DINOv2 and the flow-map error across step counts for a checkpoint or a run;
- ``diagnose``: where a flow map is wrong (single-jump error grid, each step's share of the error);
- ``schedule``: tuned k-step grids;
- ``export``: a distilled flow map as safetensors + JSON, optionally a diffusers pipeline;
- ``consolidate``: one checkpoint file from a sharded (FSDP2) checkpoint directory;
- ``prepare``: datasets of latents as WebDataset shards;
- ``reference``: cached FID / FD_DINOv2 reference statistics of a dataset split;
- ``classifier``: the digits classifier behind the digits FID features.

Each module's ``main(argv)`` is also usable from Python. Commands only parse arguments and call the
library: nothing below this package imports it (docs/design.md section 7).
"""
