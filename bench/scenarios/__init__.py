"""One module per scenario of issue #8; each has ``run(ctx) -> ScenarioResult``."""
