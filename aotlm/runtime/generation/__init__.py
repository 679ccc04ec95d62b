"""Generation: sequences, the scheduler and its block manager (no jax), the batch packer, the runner that calls sealed executables, the engine loop and its async wrapper."""
