#!/bin/sh
# The image's entrypoint: runs `corolla ARGS`. When INITIAL_PEERS_FILE names a file of multiaddresses
# (written by `corolla peer-id --host H --port P --output FILE` from the bootstrap node's identity, by compose's
# `bootstrap` step or a Kubernetes init container), they are passed as --initial-peers: nobody pastes a peer
# id by hand.
set -eu
if [ -n "${INITIAL_PEERS_FILE:-}" ]; then
    if [ ! -s "$INITIAL_PEERS_FILE" ]; then
        echo "corolla-entrypoint: $INITIAL_PEERS_FILE is missing or empty (\`corolla peer-id --output\` writes it)" >&2
        exit 1
    fi
    # one multiaddress per line, none with spaces
    # shellcheck disable=SC2046
    exec corolla "$@" --initial-peers $(cat "$INITIAL_PEERS_FILE")
fi
exec corolla "$@"
