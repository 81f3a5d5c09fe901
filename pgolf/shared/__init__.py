"""Shared by every stage: the file formats and I/O (io, tensorfile, shards, byte_tables,
tokenizer_meta, train_files), the paths passed between stages (layout), the model and its Triton
kernels (model, kernels/), the per-row quantization rule (rowquant), val_bpb (bpb), torch.distributed
(dist) and progress bars (progress). Nothing here imports a stage folder, so every stage's DVC
deps are its own folder plus this one."""
