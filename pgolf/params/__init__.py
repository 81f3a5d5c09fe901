"""The params gates and profiles: params.yaml checked whole before any stage runs (params), its
values checked against the prepared data before training (data_check), the checked values the
stages read (params.read), and profiles/ written out as a complete params.yaml (profiles)."""
