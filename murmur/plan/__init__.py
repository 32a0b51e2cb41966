"""The fleet planner: which layouts of a model fit on N GPUs, how fast they train, how long and at what cost.

gpus (the hardware table), memory (per-GPU memory of a layout), search (layouts ranked by a communication
cost model), schedule (time, cost, Chinchilla sizing, failures), shapes (a shape for a parameter count),
planner (one plan from a request), launch (recipe, torchrun and Slurm files).
"""
