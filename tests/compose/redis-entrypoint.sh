#!/bin/sh
# as the official image: a bare `redis-server ...` runs without protected mode (no config file is given)
if [ "$1" = "redis-server" ]; then
  shift
  exec redis-server --protected-mode no "$@"
fi
exec "$@"
