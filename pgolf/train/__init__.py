"""The train stage (shards -> artifacts/train/): the training loop (train), resumable checkpoints
(checkpoint), EMA/SWA weight averages (averages), the training clock (timing), the lr and
momentum schedules (schedule), Muon and AdamW (optim), online Hessians (hessian) and the token
loader (loader). Imports only pgolf.shared and pgolf.config; no stage after train imports it."""
