"""The train stage (shards -> artifacts/train/): the training loop (train), its inputs (inputs) and
outputs (outputs), compile priming (priming), the schedule's triggers (triggers), device and
cross-rank helpers (device), resumable checkpoints (checkpoint), EMA/SWA weight averages (averages),
the training clock (timing), the lr and momentum schedules (schedule), Muon and AdamW (optim),
online Hessians (hessian) and the token loader (loader). Imports only pgolf.shared and pgolf.config;
no stage after train imports it."""
