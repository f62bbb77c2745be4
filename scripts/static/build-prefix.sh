#!/usr/bin/env bash
# Build the static C prefix that the musl release binary links: libcryptsetup (OpenSSL backend, library
# only), libdevmapper (libdm only), OpenSSL libcrypto (no dlopen, no modules, no config autoload),
# json-c, libuuid and libblkid, all compiled with musl-gcc into PREFIX.
#
# Usage: build-prefix.sh PREFIX WORKDIR
#   PREFIX   final install prefix (paths are baked into the .pc files: build it where it will be used)
#   WORKDIR  scratch directory for the Debian sources and build trees (removed by the caller)
#
# Called by scripts/build-static, which hashes THIS FILE (pins included) into the cache directory name:
# changing a pin or a configure flag here gives a new prefix; nothing else does.
#
# Sources come from Debian's source packages, pinned to exact versions. `apt-get source` checks the
# downloaded .dsc against the signed Sources index (InRelease) and `dpkg-source -x` checks every tarball
# against the checksums in the .dsc, so nothing unverified is built. The deb-src entries it needs are
# added by scripts/build-static (ensure_deb_src) before this runs.
set -euo pipefail

# ---- pins (what the bookworm mirror serves; `apt-cache showsrc <pkg>` lists the candidates) ----------
# openssl: the bookworm-security 3.0.22-1~deb12u2 .dsc was 404 on the mirror (only the orig tarball was
# there), so the bookworm point-release version is pinned.
PINS=(
  "cryptsetup=2:2.6.1-4~deb12u2"
  "lvm2=2.03.16-2"
  "json-c=0.16-2"
  "util-linux=2.38.1-5+deb12u3"
  "openssl=3.0.20-1~deb12u2"
)

PREFIX=${1:?usage: build-prefix.sh PREFIX WORKDIR}
WORK=${2:?usage: build-prefix.sh PREFIX WORKDIR}
JOBS=$(nproc)

log() { printf 'build-prefix: %s\n' "$*" >&2; }
step_start=0
step() { step_start=$SECONDS; log "$*"; }
step_done() { log "  done in $((SECONDS - step_start)) s"; }

mkdir -p "$WORK/src" "$PREFIX/include" "$PREFIX/lib/pkgconfig"
SRC=$WORK/src

# ---- sources -----------------------------------------------------------------------------------------
step "apt-get source ${PINS[*]}"
(
  cd "$SRC"
  # _apt cannot write into root's scratch dirs; apt then downloads as root and says so. Harmless.
  if ! apt-get source --only-source "${PINS[@]}" >"$WORK/apt-source.log" 2>&1; then
    cat "$WORK/apt-source.log" >&2
    log "error: could not fetch/verify the pinned Debian sources."
    log "  A pinned version may have left the mirror: compare with \`apt-cache showsrc <pkg>\` and update"
    log "  PINS in scripts/static/build-prefix.sh."
    exit 1
  fi
)
step_done

srcdir() { # srcdir PKG -> the one extracted tree of that source package
  local d
  d=$(find "$SRC" -mindepth 1 -maxdepth 1 -type d -name "$1-*" | head -n 1)
  [ -n "$d" ] || { log "error: no extracted source tree for $1"; exit 1; }
  printf '%s\n' "$d"
}

# ---- common musl environment -------------------------------------------------------------------------
export CC=musl-gcc
export CFLAGS="-O2 -fPIC -ffunction-sections -fdata-sections"
export CPPFLAGS="-I$PREFIX/include"
export LDFLAGS="-L$PREFIX/lib"
export PKG_CONFIG_LIBDIR="$PREFIX/lib/pkgconfig" # LIBDIR, not PATH: never see the host's glibc .pc files
unset PKG_CONFIG_PATH PKG_CONFIG_SYSROOT_DIR

# Kernel UAPI headers for musl-gcc and for bindgen (devmapper.pc/libcryptsetup.pc put -I$PREFIX/include).
ln -sfn /usr/include/linux "$PREFIX/include/linux"
ln -sfn /usr/include/asm-generic "$PREFIX/include/asm-generic"
ln -sfn /usr/include/x86_64-linux-gnu/asm "$PREFIX/include/asm"
# musl's empty libm/libdl/... archives: devmapper.pc says -lm, and without these the host gcc driver
# picks glibc's libm.a for the musl link (undefined _dl_x86_cpu_features).
for l in m dl pthread rt util resolv; do
  cp "/usr/lib/x86_64-linux-musl/lib$l.a" "$PREFIX/lib/"
done

# ---- json-c ------------------------------------------------------------------------------------------
step "json-c"
mkdir -p "$WORK/build-json-c"
(
  cd "$WORK/build-json-c"
  cmake "$(srcdir json-c)" -DCMAKE_C_COMPILER=musl-gcc -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_C_FLAGS_RELEASE="-O2 -ffunction-sections -fdata-sections" \
    -DCMAKE_INSTALL_PREFIX="$PREFIX" -DCMAKE_INSTALL_LIBDIR=lib -DBUILD_SHARED_LIBS=OFF \
    -DBUILD_STATIC_LIBS=ON -DBUILD_TESTING=OFF -DBUILD_APPS=OFF \
    -DCMAKE_POSITION_INDEPENDENT_CODE=ON -DDISABLE_EXTRA_LIBS=ON -DDISABLE_WERROR=ON >"$WORK/json-c.log" 2>&1
  make -j"$JOBS" >>"$WORK/json-c.log" 2>&1
  make install >>"$WORK/json-c.log" 2>&1
) || { tail -n 40 "$WORK/json-c.log" >&2; exit 1; }
step_done

# ---- libuuid + libblkid (util-linux) -----------------------------------------------------------------
# libblkid answers "what is on this device" (every prober udev uses). Only its probing API is called:
# the blkid cache (/run/blkid/blkid.tab) and /etc/blkid.conf belong to blkid_get_cache and
# blkid_evaluate_tag, which initcrypt never calls (tests/static/check-static.sh traces a probe run).
step "libuuid + libblkid (util-linux)"
(
  cd "$(srcdir util-linux)"
  ./configure --prefix="$PREFIX" --libdir="$PREFIX/lib" --disable-all-programs --enable-libuuid \
    --enable-libblkid \
    --disable-shared --enable-static --disable-nls --without-systemd --without-udev --without-python \
    --without-tinfo --without-ncurses --without-readline --disable-bash-completion --disable-asciidoc \
    >"$WORK/util-linux.log" 2>&1
  make -j"$JOBS" >>"$WORK/util-linux.log" 2>&1
  make install >>"$WORK/util-linux.log" 2>&1
) || { tail -n 40 "$WORK/util-linux.log" >&2; exit 1; }
step_done

# ---- libdevmapper (lvm2, libdm only; no libaio) ------------------------------------------------------
step "libdevmapper (lvm2)"
(
  cd "$(srcdir lvm2)"
  ./configure --prefix="$PREFIX" --libdir="$PREFIX/lib" --with-usrlibdir="$PREFIX/lib" --enable-static_link \
    --enable-pkgconfig --disable-selinux --disable-udev_sync --disable-udev_rules --disable-readline \
    --disable-blkid_wiping --disable-systemd-journal --disable-app-machineid --disable-nls \
    --disable-dmeventd --disable-cmdlib >"$WORK/lvm2.log" 2>&1
  # libdm/make.tmpl ignores CPPFLAGS, and the shared-lib symbol export step runs `cc -E` without CFLAGS:
  # build only the static archive.
  make -j"$JOBS" -C libdm CFLAGS="$CFLAGS $CPPFLAGS" ioctl/libdevmapper.a >>"$WORK/lvm2.log" 2>&1
  make -C libdm install_include install_pkgconfig install_ioctl_static >>"$WORK/lvm2.log" 2>&1
) || { tail -n 40 "$WORK/lvm2.log" >&2; exit 1; }
step_done

# ---- OpenSSL (libcrypto; legacy provider built in, nothing loaded at run time) -----------------------
# no-module/no-dso: providers are built in, no dlopen. no-autoload-config: never reads openssl.cnf.
# no-sock/no-async/no-engine/no-ui-console: nothing libcryptsetup needs, and no NSS/getaddrinfo.
# libcryptsetup uses only hashes, HMAC, PBKDF2, symmetric ciphers and RAND from libcrypto; the built-in
# providers' dispatch tables would still pull every public-key family into the binary, so those are
# compiled out (no-ec/dh/dsa + the CMS/OCSP/TS/CT/CMP/SRP/PSK/RFC3779/comp layers): 3.87 -> 2.97 MB
# measured on a probe binary. The legacy provider (ripemd160, whirlpool, blowfish, cast5... old LUKS1
# and TCRYPT) stays, built in.
step "openssl"
(
  cd "$(srcdir openssl)"
  ./Configure linux-x86_64 --prefix="$PREFIX" --libdir=lib --openssldir=/nonexistent/ssl \
    no-shared no-module no-dso no-engine no-async no-tests no-sock no-ui-console no-autoload-config \
    no-ec no-dh no-dsa no-cms no-ct no-ocsp no-ts no-srp no-cmp no-rfc3779 no-comp no-psk \
    -fPIC -ffunction-sections -fdata-sections >"$WORK/openssl.log" 2>&1
  make -j"$JOBS" build_libs >>"$WORK/openssl.log" 2>&1
  make install_dev >>"$WORK/openssl.log" 2>&1
) || { tail -n 40 "$WORK/openssl.log" >&2; exit 1; }
step_done

# ---- libcryptsetup (library only) --------------------------------------------------------------------
step "libcryptsetup"
(
  cd "$(srcdir cryptsetup)"
  {
    ./autogen.sh
    # popt is required by configure even with every tool disabled (never linked into the library).
    ./configure --prefix="$PREFIX" --libdir="$PREFIX/lib" --enable-static --disable-shared \
      --disable-asciidoc --disable-ssh-token --disable-external-tokens --disable-cryptsetup \
      --disable-veritysetup --disable-integritysetup --disable-selinux --disable-udev --disable-nls \
      --disable-blkid --with-crypto_backend=openssl --enable-internal-argon2 \
      ac_cv_lib_popt_poptConfigFileToString=yes
    make -j"$JOBS" libcryptsetup.la
    make install-libLTLIBRARIES install-includeHEADERS install-pkgconfigDATA
  } >"$WORK/cryptsetup.log" 2>&1
) || { tail -n 40 "$WORK/cryptsetup.log" >&2; exit 1; }
step_done

# Nothing dynamic may be left for the linker to prefer.
find "$PREFIX/lib" -name '*.so*' -delete
find "$PREFIX/lib" -name '*.la' -delete

{
  printf '# pinned Debian source packages\n'
  printf '%s\n' "${PINS[@]}"
  printf '# .dsc sha256\n'
  (cd "$SRC" && sha256sum ./*.dsc)
  printf '# toolchain\n'
  dpkg-query -W -f='${Package}=${Version}\n' musl-dev gcc-12 linux-libc-dev 2>/dev/null || true
} >"$PREFIX/SOURCES"
log "prefix ready: $PREFIX"
