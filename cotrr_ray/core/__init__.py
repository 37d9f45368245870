"""Ray-free core: feature spec, request schema, features, model, losses, metrics, calibration, ranking."""
