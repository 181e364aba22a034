"""`make bench`: this project side by side with what a user would pick instead, measured alternately in one run.

One module per comparison, each `run(ctx) -> rows`: `training` (elastic super-adapter vs plain PEFT LoRA),
`accelerate_loop` (the training loop on accelerate vs a plain loop, 2 processes vs 1, a checkpoint's cost),
`wanda` (our pruning vs a plain implementation of the published algorithm), `search` (cached, batched subnet
evaluation vs no cache and vs batch size 1), `generation` (merged extracted model vs base vs unmerged PEFT).
`context` loads a profile's config, model and data; `runner` alternates the variants and writes the table.
"""
