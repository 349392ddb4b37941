"""What the commands do with a model outside the training loop: `ptlm probe`'s real-step search
(probe), the memory measurement of one step (memtrace) and `ptlm generate` (generate). They use
the run's engine builder and evaluation; the training run never imports them."""
