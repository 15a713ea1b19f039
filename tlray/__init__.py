"""tlray: distributed transfer learning with timm, Ray Train/Tune/Data and MLflow.

The packages follow the data flow (docs/architecture.md): `config` (settings) -> `data`
(sources, prepared Parquet datasets, Ray Data ingest, pixels to model input) -> `model`
(timm backbone, weights, the frozen-front cache) -> `track` (MLflow) -> `serve` (the logged
pyfunc) -> `train` (preflight plan, per-worker loop, launch) -> `tune` (the sweep) ->
`compare` -> `bench` -> `cli`. Each imports only packages before it. Importing tlray changes
nothing outside it.
"""

__version__ = "0.1.0"
