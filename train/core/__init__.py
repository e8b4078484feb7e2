"""The training core: model, layers, loss, optimizer, sharding, state, step, checkpoints and run
directories, the loop and its hooks, metrics, distributed start-up. Imports nothing above it."""
