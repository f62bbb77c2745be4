#!/bin/sh
# Check that the shipped initcrypt binary is fully static and self-contained:
#   * `file`, `ldd`, `readelf` agree it is static (no PT_INTERP, no DT_NEEDED), and it is <= 5 MiB;
#   * run under strace, it opens no shared object and no config file: nothing matching *.so*, /etc/...
#     (except /etc/initcrypt/...), /usr/lib/..., /lib/..., openssl.cnf, ossl-modules, /usr/lib/ssl;
#     runs: `initcrypt --help`, `initcrypt keyvol --device <FAT image labelled "BEK VOLUME">` (once the
#     binary has that subcommand), `initcrypt encrypt-image` + `decrypt-image` on an 8 MiB image
#     (LUKS2 format, load, keyslot open in the shipped binary), `encrypt-image` of a FAT32 image
#     (libblkid's probe sizes its crypt sectors: 512), and the static musl build of
#     tests/static_luks.rs, which formats a
#     LUKS2 detached header on an image file, loads it back and checks passphrases with the
#     libcryptsetup linked into it (no device-mapper needed).
#
# Usage: tests/static/check-static.sh [--no-build] [BINARY]
#   Without --no-build it first runs scripts/build-static (seconds when the prefix is cached) and
#   builds the static test binary with `scripts/build-static --test-bin static_luks`.
#   With --no-build, STATIC_LUKS_TEST may name an already built static test binary (else that part fails).
# Needs: file, binutils (readelf), strace, dosfstools (mkfs.vfat), mtools (mcopy), cryptsetup; scripts/build-static
# installs them. Exit 0 only if every check passed; the last line is "N passed, N failed".
# POSIX sh (scripts/test runs it with `sh`).
set -eu

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGET=x86_64-unknown-linux-musl
# 5 MiB: was 4 MiB until libblkid (superblock probes, +170 KB) and the operator commands
# (check, enable, disable, rotate, status: +400 KB) joined the one binary; optimising the
# dependencies for size saved only 29 KB, the rest is libcryptsetup, OpenSSL and our code.
MAX_SIZE=$((5 * 1024 * 1024))

build=1
if [ "${1:-}" = --no-build ]; then build=0; shift; fi
BIN=${1:-${CARGO_TARGET_DIR:-$ROOT/target}/$TARGET/release/initcrypt}

passed=0
failed=0
ok() { passed=$((passed + 1)); printf 'ok   %s\n' "$*"; }
fail() { failed=$((failed + 1)); printf 'FAIL %s\n' "$*"; }
skip() { printf 'skip %s\n' "$*"; }

for tool in file ldd readelf strace mkfs.vfat mcopy cryptsetup; do
  command -v "$tool" >/dev/null 2>&1 || { echo "check-static: missing tool: $tool" >&2; exit 1; }
done

# On disk, not tmpfs: the pass engine writes images with O_DIRECT.
mkdir -p "$ROOT/target"
TMP=$(mktemp -d "${CHECK_STATIC_TMPDIR:-$ROOT/target}/check-static.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

LUKS_TEST=${STATIC_LUKS_TEST:-}
if [ "$build" = 1 ]; then
  "$ROOT/scripts/build-static" >&2
  LUKS_TEST=$("$ROOT/scripts/build-static" --test-bin static_luks)
fi

# ---- static linkage ----------------------------------------------------------------------------------
check_static() { # check_static FILE LABEL
  f=$1 what=$2
  out=$(file -b "$f")
  case $out in
    *"statically linked"* | *"static-pie linked"*) ok "$what: file: $out" ;;
    *) fail "$what: file does not say static: $out" ;;
  esac
  # ldd exits 1 on a non-dynamic executable; only its words count.
  out=$(ldd "$f" 2>&1 || true)
  case $out in
    *"not a dynamic executable"* | *"statically linked"*) ok "$what: ldd: $(printf '%s' "$out" | tr -s '[:space:]' ' ' | sed 's/^ //')" ;;
    *) fail "$what: ldd lists dependencies: $out" ;;
  esac
  if readelf -lW "$f" | grep -q 'INTERP'; then
    fail "$what: has a PT_INTERP program header (needs a dynamic loader)"
  elif readelf -dW "$f" 2>/dev/null | grep -q '(NEEDED)'; then
    fail "$what: has DT_NEEDED entries: $(readelf -dW "$f" | grep '(NEEDED)' | tr -s ' ')"
  else
    ok "$what: readelf: no PT_INTERP, no DT_NEEDED"
  fi
}

# ---- what a process opens ----------------------------------------------------------------------------
# Paths that must never be opened (or even tried) by the static binary at run time.
FORBIDDEN='(\.so($|\.))|^/etc/|^/usr/lib/|^/usr/lib64/|^/usr/local/lib|^/lib/|^/lib64/|openssl\.cnf|ossl-modules|/usr/lib/ssl'
ALLOWED='^/etc/initcrypt/'

# traced LABEL EXPECTED_RC CMD... : run CMD under strace in a clean environment (as in an initramfs),
# keep its output in $TMP/LABEL.out, fail on an unexpected exit code or a forbidden open.
traced() {
  label=$1 want_rc=$2 rc=0
  shift 2
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    strace -f -qq -e trace=open,openat,openat2 -o "$TMP/$label.strace" "$@" >"$TMP/$label.out" 2>&1 || rc=$?
  # path = first quoted argument of each open call (also "<unfinished ...>" halves)
  sed -n 's/^\([0-9]* *\)\{0,1\}open[a-z0-9]*([^"]*"\([^"]*\)".*/\2/p' "$TMP/$label.strace" | sort -u >"$TMP/$label.paths"
  if [ "$rc" != "$want_rc" ]; then
    fail "$label: exit code $rc, expected $want_rc; output:"
    sed 's/^/    /' "$TMP/$label.out" | tail -n 30
  else
    ok "$label: exit code $rc"
  fi
  bad=$(grep -E "$FORBIDDEN" "$TMP/$label.paths" | grep -Ev "$ALLOWED" || true)
  if [ -n "$bad" ]; then
    fail "$label: opened shared objects or config files:"
    printf '%s\n' "$bad" | sed 's/^/    /'
  else
    ok "$label: opened $(wc -l <"$TMP/$label.paths") distinct paths, none a .so or config file"
  fi
}

# ---- the shipped binary ------------------------------------------------------------------------------
if [ ! -x "$BIN" ]; then
  fail "no binary at $BIN (run scripts/build-static)"
else
  check_static "$BIN" initcrypt
  size=$(stat -c %s "$BIN")
  if [ "$size" -le "$MAX_SIZE" ]; then
    ok "initcrypt: size $size bytes <= 5 MiB"
  else
    fail "initcrypt: size $size bytes > 5 MiB ($MAX_SIZE)"
  fi

  traced help 0 "$BIN" --help
  if grep -q '^Usage:' "$TMP/help.out"; then
    ok "initcrypt --help prints usage"
  else
    skip "initcrypt --help printed no 'Usage:' (the CLI is not in src/ yet?)"
  fi

  if grep -Eq '^[[:space:]]+keyvol([[:space:]]|$)' "$TMP/help.out"; then
    # A key volume as the key volume image tests make it: FAT, label "BEK VOLUME", one key file.
    key=$(head -c 127 /dev/urandom | base64 -w0)
    printf '%s' "$key" >"$TMP/LinuxPassPhraseFileName"
    mkfs.vfat -C -n 'BEK VOLUME' "$TMP/bek.img" 4096 >/dev/null
    mcopy -i "$TMP/bek.img" "$TMP/LinuxPassPhraseFileName" ::LinuxPassPhraseFileName
    traced keyvol 0 "$BIN" keyvol --device "$TMP/bek.img"
    if grep -q 'LinuxPassPhraseFileName' "$TMP/keyvol.out"; then
      ok "keyvol lists the key file"
    else
      fail "keyvol output does not name LinuxPassPhraseFileName:"
      sed 's/^/    /' "$TMP/keyvol.out"
    fi
    if grep -qF "$key" "$TMP/keyvol.out"; then
      fail "keyvol printed the key file's contents"
    fi
  else
    skip "initcrypt has no keyvol subcommand yet: keyvol not traced"
  fi

  if grep -Eq '^[[:space:]]+encrypt-image([[:space:]]|$)' "$TMP/help.out" \
    && grep -Eq '^[[:space:]]+decrypt-image([[:space:]]|$)' "$TMP/help.out"; then
    # libcryptsetup inside the shipped binary: encrypt-image formats a detached LUKS2 header,
    # decrypt-image loads it back, opens the keyslot and restores the plaintext.
    head -c $((8 << 20)) /dev/urandom >"$TMP/data.img"
    plain=$(sha256sum <"$TMP/data.img")
    head -c 127 /dev/urandom | base64 -w0 >"$TMP/pass.key"
    traced encrypt-image 0 "$BIN" encrypt-image --raw --device "$TMP/data.img" --header "$TMP/hdr" --key-file "$TMP/pass.key"
    if [ "$(sha256sum <"$TMP/data.img")" != "$plain" ] && [ -s "$TMP/hdr" ]; then
      ok "encrypt-image changed the data and wrote a LUKS2 header"
    else
      fail "encrypt-image left the data unchanged or wrote no header"
    fi
    traced decrypt-image 0 "$BIN" decrypt-image --device "$TMP/data.img" --header "$TMP/hdr" --key-file "$TMP/pass.key"
    if [ "$(sha256sum <"$TMP/data.img")" = "$plain" ]; then
      ok "decrypt-image (LUKS2 header load + keyslot) restored the plaintext"
    else
      fail "decrypt-image did not restore the plaintext"
    fi

    # libblkid inside the shipped binary: encrypt-image probes the device to size its crypt sectors.
    # A FAT with 512-byte sectors must get 512 (blkid's BLOCK_SIZE; without the probe it is 4096),
    # and blkid must open no config file and write no cache while doing it.
    mkfs.vfat -C -F 32 -s 1 "$TMP/fat.img" 40960 >/dev/null
    traced probe-encrypt-image 0 "$BIN" encrypt-image --device "$TMP/fat.img" --header "$TMP/fat.hdr" --key-file "$TMP/pass.key"
    if cryptsetup luksDump "$TMP/fat.hdr" 2>/dev/null | grep -q 'sector: 512 \[bytes\]'; then
      ok "libblkid probed the FAT image: 512-byte crypt sectors"
    else
      fail "the FAT image did not get 512-byte crypt sectors (libblkid probe):"
      cryptsetup luksDump "$TMP/fat.hdr" 2>&1 | grep -i sector | sed 's/^/    /'
    fi
    if grep -E 'blkid' "$TMP/probe-encrypt-image.paths" >/dev/null; then
      fail "the probe run opened a blkid file: $(grep -E 'blkid' "$TMP/probe-encrypt-image.paths" | tr '\n' ' ')"
    else
      ok "the probe run opened no blkid cache or config file"
    fi
  else
    skip "initcrypt has no encrypt-image/decrypt-image yet: LUKS in the shipped binary not traced"
  fi
fi

# ---- libcryptsetup inside a static binary: format + load a LUKS2 header --------------------------------
if [ -z "$LUKS_TEST" ] || [ ! -x "$LUKS_TEST" ]; then
  fail "no static build of tests/static_luks.rs (scripts/build-static --test-bin static_luks)"
else
  check_static "$LUKS_TEST" static_luks
  traced static_luks 0 "$LUKS_TEST" --test-threads=1
  if grep -q 'test result: ok. 1 passed' "$TMP/static_luks.out"; then
    ok "static_luks: LUKS2 format + load + passphrase check passed in the static binary"
  else
    fail "static_luks: test did not pass:"
    sed 's/^/    /' "$TMP/static_luks.out" | tail -n 30
  fi
fi

echo
echo "check-static: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
