"""The network: a timm backbone with a new head and frozen groups (`build`; `heads`, `scratch`,
`freeze`, `backbone_names`), where its starting weights come from (`weights`; `weight_hub`,
`state_dicts`), where it can be cut after its frozen front (`cut`), and the cache of that
front's outputs (`feature_cache`)."""
