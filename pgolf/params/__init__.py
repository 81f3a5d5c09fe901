"""The params stage, the gate before every other stage: checking all of params.yaml with each
section owner's range checks (params) and the complete params files of profiles/ (profiles,
`python -m pgolf.profiles`)."""
