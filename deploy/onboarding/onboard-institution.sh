#!/usr/bin/env bash
# Operator side: onboard one institution from the request folder it sent you.
#   deploy/onboarding/onboard-institution.sh NAME REQUEST_DIR COORDINATOR_ADDRESS [DATA_DIR]
# Writes ./bundle-NAME to send back to the site. See docs/onboarding.md.
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 NAME REQUEST_DIR COORDINATOR_ADDRESS [DATA_DIR]" >&2
    exit 2
fi
name="$1"; request="$2"; address="$3"; data_dir="${4:-.consortium}"
if [ ! -f "$data_dir/pki/ca.crt" ]; then
    # The server certificate must name the host sites are told (the address's host).
    host="${address%:*}"; host="${host#[}"; host="${host%]}"
    echo "no consortium in $data_dir yet; creating it (coordinator init --host $host)"
    coordinator init --data-dir "$data_dir" --host "$host" --host localhost --host 127.0.0.1
fi
coordinator onboard "$name" --request "$request" --data-dir "$data_dir" \
    --coordinator-address "$address" --out "bundle-$name"
echo "send bundle-$name/ to $name; tell them this CA fingerprint by another channel:"
cat "bundle-$name/ca.sha256"
