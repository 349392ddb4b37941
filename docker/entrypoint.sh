#!/usr/bin/env bash
# Entry point of the ptlm image (docker/Dockerfile); also runs as is outside Docker.
#
#   docker run IMAGE                                   -> ptlm --help
#   docker run IMAGE --version                         -> ptlm --version (first argument an option)
#   docker run IMAGE ptlm plan ...                     -> runs that command
#   docker run IMAGE deepspeed launch/train.py ...     -> runs that command
#   docker run IMAGE python ...                        -> runs that command
#
# The command replaces this shell (exec): it receives signals directly and its exit status is
# the container's.
set -e

if [ "$#" -eq 0 ]; then
  exec ptlm --help
fi

case "$1" in
  -*) exec ptlm "$@" ;;
esac

exec "$@"
