"""Sources -> prepared Parquet datasets -> Ray Data batches -> the model's input tensors.

`sources` reads and validates raw image sets, `prepare` writes them as datasets, `dataset`
reads a prepared one back, `ingest` streams it through Ray Data to the workers, `preprocess`
turns uint8 pixels into normalised tensors (training, evaluation and serving alike), and
`augment` draws training-time augmentations on the device.
"""
