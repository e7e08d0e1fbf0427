"""Examples of lightning-kfac: LightningModules/DataModules on the digits,
the Hydra app, the demo."""
