#!/usr/bin/env bash
# Fetch the LLM-Adapters benchmark files into this repository: dataset/<name>/test.json and
# ft-training_set/{commonsense_170k,math_10k}.json, from the AGI-Edgerunners/LLM-Adapters GitHub
# repository. Files already in the repository are skipped. Without network access it lists what is
# missing and where else the data resolver (dense_lora/data.py) would look; it exits non-zero while
# a required file is found nowhere.
#
# Usage: bash scripts/download_data.sh
# Environment: LLM_ADAPTERS_URL  raw-file base URL (default: the main branch on GitHub), e.g. a fork
#              or a pinned commit; DENSELORA_DATA  an extra data folder the resolver searches first.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
base_url="${LLM_ADAPTERS_URL:-https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/main}"

required=()
for name in boolq piqa social_i_qa hellaswag winogrande ARC-Challenge ARC-Easy openbookqa \
    AddSub MultiArith SingleEq gsm8k AQuA SVAMP; do
    required+=("dataset/$name/test.json")
done
required+=(ft-training_set/commonsense_170k.json ft-training_set/math_10k.json)
optional=(dataset/mawps/test.json)

# The resolver's search order, minus the repository itself (see dense_lora/data.py: data_roots).
other_roots=()
if [[ -n "${DENSELORA_DATA:-}" ]]; then
    other_roots+=("$DENSELORA_DATA")
fi
other_roots+=("$(dirname "$repo_root")/shared/data")

offline=0
if ! command -v curl >/dev/null 2>&1; then
    echo "curl is not installed: nothing can be downloaded" >&2
    offline=1
fi

# fetch REL: make sure $repo_root/REL exists, downloading it if needed; status 1 when it does not.
fetch() {
    local rel="$1"
    local dest="$repo_root/$rel"
    if [[ -s "$dest" ]]; then
        echo "present  $rel"
        return 0
    fi
    if ((offline)); then
        return 1
    fi
    local tmp status=0
    tmp="$(mktemp "${TMPDIR:-/tmp}/denselora-data.XXXXXX")"
    curl -fsSL --connect-timeout 15 --retry 2 -o "$tmp" "$base_url/$rel" || status=$?
    if ((status != 0)); then
        rm -f "$tmp"
        case "$status" in
        6 | 7 | 28)
            echo "cannot reach $base_url (curl exit $status); not trying the remaining files" >&2
            offline=1
            ;;
        *) echo "failed   $rel (curl exit $status)" >&2 ;;
        esac
        return 1
    fi
    # A dataset is a JSON list; anything else is an error page or a Git LFS pointer.
    if [[ "$(tr -d ' \t\r\n' <"$tmp" | head -c 1)" != "[" ]]; then
        rm -f "$tmp"
        echo "failed   $rel (downloaded file is not a JSON list)" >&2
        return 1
    fi
    mkdir -p "$(dirname "$dest")"
    mv "$tmp" "$dest"
    echo "fetched  $rel"
}

# elsewhere REL: print the first other resolver root holding REL; status 1 when none does.
elsewhere() {
    local root
    for root in "${other_roots[@]}"; do
        if [[ -s "$root/$1" ]]; then
            echo "$root/$1"
            return 0
        fi
    done
    return 1
}

missing=()
for rel in "${required[@]}" "${optional[@]}"; do
    if ! fetch "$rel"; then
        missing+=("$rel")
    fi
done

if ((${#missing[@]} == 0)); then
    echo "all benchmark files are in $repo_root"
    exit 0
fi

echo
echo "not in $repo_root:"
unresolved=0
for rel in "${missing[@]}"; do
    kind="required"
    if [[ " ${optional[*]} " == *" $rel "* ]]; then
        kind="optional"
    fi
    if found="$(elsewhere "$rel")"; then
        echo "  $rel ($kind): the resolver uses $found"
    else
        echo "  $rel ($kind): MISSING"
        if [[ "$kind" == required ]]; then
            unresolved=$((unresolved + 1))
        fi
    fi
done

if ((unresolved > 0)); then
    cat >&2 <<EOF

$unresolved required file(s) are missing. The resolver looks for each relative path in:
  1. \$DENSELORA_DATA (${DENSELORA_DATA:-unset})
  2. $(dirname "$repo_root")/shared/data
  3. $repo_root
Either rerun this script where $base_url is reachable, copy the files from a clone of
https://github.com/AGI-Edgerunners/LLM-Adapters (same relative paths), or set DENSELORA_DATA to a
folder holding dataset/ and ft-training_set/.
EOF
    exit 1
fi
echo "every required file is available to the resolver"
