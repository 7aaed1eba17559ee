#!/usr/bin/env bash
# Site side, in two steps (see docs/onboarding.md):
#   deploy/onboarding/join-institution.sh keygen NAME [STATE_DIR]
#       -> creates your keys; send STATE_DIR/request/ to the operator
#   deploy/onboarding/join-institution.sh join BUNDLE_DIR DATA_DIR [STATE_DIR] [GPU]
#       -> checks the bundle and joins the consortium until Ctrl-C
set -euo pipefail
case "${1:-}" in
    keygen)
        name="${2:?institution name}"; state="${3:-.consortium-client/$name}"
        client keygen --institution "$name" --state-dir "$state"
        ;;
    join)
        bundle="${2:?bundle dir}"; data="${3:?data dir}"
        name="$(sed -n 's/^institution = "\(.*\)"$/\1/p' "$bundle/bundle.toml")"
        # The name becomes a path: the rule onboarding holds names to (consortium/names.py).
        case "$name" in
            *[!A-Za-z0-9_-]*) valid=no ;;
            *[A-Za-z0-9]*) valid=yes ;;
            *) valid=no ;;
        esac
        if [ "$valid" != yes ]; then
            echo "$bundle/bundle.toml names institution '$name': use letters, digits, '-' and '_'" >&2
            exit 2
        fi
        state="${4:-.consortium-client/$name}"
        echo "CA fingerprint in this bundle (compare with the operator's):"
        cat "$bundle/ca.sha256"
        gpu=()
        if [ -n "${5:-}" ]; then gpu=(--gpu "$5"); fi
        exec client join --bundle "$bundle" --data "$data" --state-dir "$state" "${gpu[@]}"
        ;;
    *)
        echo "usage: $0 keygen NAME [STATE_DIR] | join BUNDLE_DIR DATA_DIR [STATE_DIR] [GPU]" >&2
        exit 2
        ;;
esac
