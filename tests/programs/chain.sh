#!/bin/sh
# chain.sh [NAME]: a fork/exec chain of static binaries that prints along the
# way. sh -> probe-glibc-static fork-exec -> probe-musl exec -> probe-go env NAME.
# Expected output (NAME defaults to CHAIN_VALUE):
#   chain: start
#   NAME=value            (or "NAME unset"; printed by probe-go)
#   child exit 0          (printed by probe-glibc-static)
#   chain: done status=0
dir=$(dirname "$0")
name=${1:-CHAIN_VALUE}
echo "chain: start"
"$dir/probe-glibc-static" fork-exec "$dir/probe-musl" exec "$dir/probe-go" env "$name"
status=$?
echo "chain: done status=$status"
exit $status
