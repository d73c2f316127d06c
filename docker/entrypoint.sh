#!/bin/sh
# The images' entrypoint: `python -m sgjax.server`, configured from the environment.
#   MODEL_PATH (as in `docker run -e MODEL_PATH=/models/x`) stands for SGJAX_MODEL_PATH; without either the
#   bundled SmolLM2-135M-Instruct is served. Every other flag is SGJAX_<FLAG> (SGJAX_MESH, SGJAX_API_KEY, ...),
#   or SGJAX_CONFIG=/path/file.yaml; arguments after the image name are flags and win over the environment.
#   SGJAX_DRY_RUN=1 prints the server's environment (secrets masked) and command instead of running it.
set -eu

if [ -z "${SGJAX_MODEL_PATH:-}" ] && [ -n "${MODEL_PATH:-}" ]; then
    export SGJAX_MODEL_PATH="$MODEL_PATH"
fi
# Inside a container the server must listen beyond loopback to be reached through a published port.
export SGJAX_HOST="${SGJAX_HOST:-0.0.0.0}"
# Compiled steps persist on the /cache volume, so a restarted container skips compiling them ('' turns it off).
export SGJAX_COMPILATION_CACHE_DIR="${SGJAX_COMPILATION_CACHE_DIR-/cache/xla}"

set -- "${SGJAX_PYTHON:-python}" -m sgjax.server "$@"
if [ "${SGJAX_DRY_RUN:-0}" = 1 ]; then
    env | grep '^SGJAX_' | grep -v '^SGJAX_DRY_RUN=' | sed -E 's/^(SGJAX_[A-Z_]*(KEY|TOKEN|SECRET|PASSWORD)[A-Z_]*)=.+/\1=***/' | sort
    echo "$*"
    exit 0
fi
exec "$@"
