"""The commands beside training, run as ``python -m flowmap_lit COMMAND`` (``flowmap_lit.cli.COMMANDS``):

- ``sample``: sample grids and ``.npz`` files from a checkpoint, at any step counts;
- ``evaluate``: FID and the flow-map error across step counts for a checkpoint;
- ``diagnose``: where a flow map is wrong (single-jump error grid, each step's share of the error);
- ``schedule``: tuned k-step grids (also ``python -m flowmap_lit schedule``).

Each module's ``main(argv)`` is also usable from Python; ``sample``'s ``load_module`` and
``generate`` are the notebook's entry points.
"""
