"""Offline tools, not on the serving path: model provisioning (the embedded SmolLM2 and the
tiny debug models CI uses) and the rhythm analysis and views behind `score/show/analyze`."""
