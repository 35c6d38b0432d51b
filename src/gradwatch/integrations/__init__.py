"""Framework integrations, each imported on its own: `gradwatch.integrations.lightning`,
`gradwatch.integrations.transformers`. They call `gw.watch` for the framework."""
