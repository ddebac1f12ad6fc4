#!/usr/bin/env bash
# Builds the seed corpora in fuzz/corpus/<target>/ from the repository's own fixtures,
# pipelines and config files (nothing is downloaded; the corpora are not committed).
set -euo pipefail
cd "$(dirname "$0")"
root=..
nul() { printf '\0'; }
mk() { mkdir -p "corpus/$1"; }

mk verify_hmac
i=0
for f in "$root"/fixtures/{shopify,woocommerce,square,quickbooks}/*.json; do
  sel=$((i % 4)); i=$((i + 1))
  { printf "\\x$(printf %02x "$sel")"; printf 'dGFn'; nul
    printf 'https://hooks.example.com/hooks/src'; nul; cat "$f"; } > "corpus/verify_hmac/seed-$i"
done

mk verify_stripe
i=0
for f in "$root"/fixtures/stripe/*.json; do
  i=$((i + 1))
  { printf '\x00\xf1\x53\x65\x00\x00\x00\x00'
    printf 't=1700000000,v0=abcd,v1=%064d' 0; nul; cat "$f"; } > "corpus/verify_stripe/seed-$i"
done

mk verify_paypal
i=0
for f in "$root"/fixtures/paypal/*.json; do
  i=$((i + 1))
  { printf '\x00'; printf 'b2f1c5a0-1234-11ef-8a6b-0f1e2d3c4b5a'; nul
    printf '2026-11-20T10:15:30Z'; nul; printf 'c2lnbmF0dXJl'; nul
    printf 'https://api.paypal.com/v1/notifications/certs/CERT-fuzz'; nul
    printf 'SHA256withRSA'; nul; cat "$f"; } > "corpus/verify_paypal/seed-$i"
done

mk identify
i=0
for conn in shopify woocommerce stripe square paypal quickbooks; do
  for f in "$root"/fixtures/$conn/*.json; do
    i=$((i + 1))
    { printf "\\x$(printf %02x $((i % 6)))"; printf 'orders/paid'; nul; cat "$f"; } \
      > "corpus/identify/seed-$i"
  done
done

mk config_check
cp "$root"/perkflow.yaml corpus/config_check/perkflow.yaml
for f in "$root"/fixtures/config/*.yaml; do cp "$f" "corpus/config_check/$(basename "$f")"; done

mk pipeline_check
for f in "$root"/pipelines/*.yaml; do cp "$f" "corpus/pipeline_check/$(basename "$f")"; done

mk template
i=0
# Every quoted field of the shipped pipelines and connectors that holds `{{` or `{%`.
grep -rhoE '"[^"]*(\{\{|\{%)[^"]*"' "$root"/pipelines "$root"/connectors | sort -u |
  while IFS= read -r line; do
    i=$((i + 1))
    { printf '%s' "${line:1:${#line}-2}"; nul; cat "$root"/fixtures/shopify/orders-paid.json; } \
      > "corpus/template/seed-$i"
  done
echo "seeded: $(for d in corpus/*/; do printf '%s=%s ' "$(basename "$d")" "$(ls "$d" | wc -l)"; done)"
