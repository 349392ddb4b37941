"""The machine under the run: ranks and their collectives (distributed), one writer per run folder
(lock), DeepSpeed's op builds (oplocks), this machine's hardware facts (hardware) and the
injected faults the tests use (faults). Nothing here knows about training: it imports no other
part of ptlm.run."""
