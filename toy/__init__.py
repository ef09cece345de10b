"""The toy world: 32x32 coloured shapes on plain backgrounds, drawn procedurally and captioned, with
its own small models (configs/toy/, shipped in models/toy/) so that every claim of the project can
be run and measured on a CPU in minutes.

    shapes.py     the data: scenes, rendering, captions, ShapesDataset, splits, the DreamBooth subject
"""
