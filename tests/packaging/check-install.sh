#!/bin/sh
# shellcheck disable=SC2015 # "check && ok … || bad …": ok only echoes, it never fails
# The operator's install paths: scripts/install, `make install` and the Debian package put the same
# files in the places dracut, initramfs-tools and systemd read them from, with the right modes, and
# every shell file of the boot path is shellcheck-clean. Usage: check-install.sh BINARY
set -eu
cd "$(dirname "$0")/../.."
bin=$1
fails=0
ok() { echo "ok   $1"; }
bad() { echo "FAIL $1"; fails=$((fails + 1)); }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# 1. shellcheck: hooks run in busybox sh, the dracut module in bash.
if shellcheck -x -s sh initramfs-tools-hook/hooks/initcrypt initramfs-tools-hook/scripts/local-top/initcrypt \
	scripts/install scripts/package-deb packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm &&
	shellcheck -s bash dracut-module/50initcrypt/module-setup.sh; then
	ok "shellcheck: hooks, dracut module, install and package scripts"
else
	bad "shellcheck (output above)"
fi

# 2. scripts/install into a DESTDIR: exactly these files, these modes.
expected="0755 /usr/sbin/initcrypt
0777 /usr/lib/initcrypt/initcrypt-keyscript
0644 /usr/lib/systemd/system/initcrypt-decrypt@.service
0644 /usr/lib/systemd/system/initcrypt-decrypt-data@.service
0644 /usr/lib/systemd/system/initcrypt-encrypt@.service
0644 /usr/lib/systemd/system/initcrypt-encrypt-data@.service
0644 /usr/lib/systemd/system/initcrypt-keys-cleanup.service
0644 /usr/lib/systemd/system/initcrypt-keys.service
0644 /usr/lib/dracut/modules.d/50initcrypt/module-setup.sh
0755 /usr/share/initramfs-tools/hooks/initcrypt
0755 /usr/share/initramfs-tools/scripts/local-top/initcrypt"
scripts/install --destdir "$tmp/d" --binary "$bin" >/dev/null
got=$(cd "$tmp/d" && find . \( -type f -o -type l \) -printf '%m %p\n' | sed 's| \./| /|; s/^\([0-9]\{3\}\) /0\1 /' | sort -k2)
want=$(echo "$expected" | sort -k2)
if [ "$got" = "$want" ]; then ok "scripts/install: 11 files in their places and modes"; else
	bad "scripts/install layout:"; echo "$got"
fi
cmp -s "$bin" "$tmp/d/usr/sbin/initcrypt" && ok "installed binary is the built one" || bad "installed binary differs"
[ "$(readlink "$tmp/d/usr/lib/initcrypt/initcrypt-keyscript")" = /usr/sbin/initcrypt ] &&
	ok "keyscript link points at the binary" || bad "keyscript link"
# A dynamic binary would need libraries the initramfs builders do not copy for it: refused.
cp /bin/true "$tmp/dyn"
if scripts/install --destdir "$tmp/x" --binary "$tmp/dyn" >/dev/null 2>&1; then bad "a dynamic binary was installed"; else
	ok "a dynamic binary is refused"
fi

# 3. make install = scripts/install.
make -s install DESTDIR="$tmp/m" BINARY="$bin" >/dev/null
[ "$(cd "$tmp/m" && find . | sort)" = "$(cd "$tmp/d" && find . | sort)" ] && ok "make install = scripts/install" ||
	bad "make install differs from scripts/install"

# 4. The Debian package: the same files plus the docs, and the initramfs rebuild trigger.
deb=$(scripts/package-deb --binary "$bin")
list=$(dpkg-deb -c "$deb" | awk '{print $6}' | sed 's|^\./|/|')
missing=$(echo "$expected" | while read -r _ p; do echo "$list" | grep -qx "$p" || echo "$p"; done)
[ -z "$missing" ] && ok "package holds every installed file" || bad "package lacks: $missing"
echo "$list" | grep -qx /usr/share/doc/initcrypt/README.md && ok "package holds the README" || bad "no README in the package"
dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./triggers | grep -qx 'activate-noawait update-initramfs' &&
	ok "package triggers update-initramfs" || bad "no update-initramfs trigger"
dpkg-deb -f "$deb" Package Version Architecture | tr '\n' ' ' | grep -q '^Package: initcrypt Version: .* Architecture: amd64' &&
	ok "package control fields" || bad "package control fields"
dpkg-deb -x "$deb" "$tmp/p" && cmp -s "$bin" "$tmp/p/usr/sbin/initcrypt" && ok "packaged binary is the built one" ||
	bad "packaged binary differs"

# 5. Maintainer scripts, run against stubs (never against this machine's initramfs): with
# initramfs-tools present its trigger does the rebuild; on dracut-only systems the scripts call dracut.
mkdir -p "$tmp/stub-it" "$tmp/stub-dr"
for d in "$tmp/stub-it" "$tmp/stub-dr"; do
	printf '#!/bin/sh\necho "$*" >>%s/dracut.calls\n' "$d" >"$d/dracut"
	chmod 755 "$d/dracut"
done
printf '#!/bin/sh\nexit 0\n' >"$tmp/stub-it/update-initramfs"
chmod 755 "$tmp/stub-it/update-initramfs"
for script in postinst:configure postrm:remove; do
	name=${script%%:*} arg=${script#*:}
	PATH="$tmp/stub-it" /bin/sh "packaging/debian/$name" "$arg"
	PATH="$tmp/stub-dr" /bin/sh "packaging/debian/$name" "$arg"
done
[ ! -e "$tmp/stub-it/dracut.calls" ] && ok "with initramfs-tools, the maintainer scripts leave the rebuild to its trigger" ||
	bad "dracut was called although update-initramfs exists"
[ "$(cat "$tmp/stub-dr/dracut.calls" 2>/dev/null)" = "$(printf -- '-f --regenerate-all\n-f --regenerate-all')" ] &&
	ok "dracut-only: postinst and postrm rebuild every initramfs" || bad "dracut-only rebuild calls: $(cat "$tmp/stub-dr/dracut.calls" 2>/dev/null)"

# 6. prerm: removal is refused while initcrypt opens this VM's disks; upgrades and forced removals pass.
mkdir -p "$tmp/vm/etc/initcrypt" "$tmp/vm/proc" "$tmp/plain/proc"
echo '{"version": 1, "volumes": []}' >"$tmp/vm/etc/initcrypt/volumes.json"
echo 'root=/dev/vda1 ro' >"$tmp/plain/proc/cmdline"
if INITCRYPT_ROOT="$tmp/vm" sh packaging/debian/prerm remove 2>"$tmp/prerm.err"; then bad "prerm allowed removal on a VM initcrypt unlocks"; else
	grep -q 'refusing removal' "$tmp/prerm.err" && ok "prerm refuses removal on a VM initcrypt unlocks, saying why" || bad "prerm refused without its message"
fi
INITCRYPT_ROOT="$tmp/vm" sh packaging/debian/prerm upgrade && INITCRYPT_ROOT="$tmp/vm" INITCRYPT_FORCE_REMOVE=1 sh packaging/debian/prerm remove &&
	INITCRYPT_ROOT="$tmp/plain" sh packaging/debian/prerm remove && ok "prerm allows upgrades, forced removals and removal where nothing is configured" ||
	bad "prerm refused an upgrade, a forced removal or a machine with nothing configured"
echo 'quiet rd.luks.ade.partuuid=x rd.luks.ade.bootuuid=y' >"$tmp/plain/proc/cmdline"
if INITCRYPT_ROOT="$tmp/plain" sh packaging/debian/prerm remove 2>/dev/null; then bad "prerm allowed removal on an ADE VM"; else
	ok "prerm refuses removal on a VM booted with rd.luks.ade.*"
fi
dpkg-deb --ctrl-tarfile "$deb" | tar -t | grep -qx './prerm' && ok "package carries prerm" || bad "no prerm in the package"
dpkg-deb -f "$deb" Depends | grep -q 'initramfs-tools | dracut' && ok "package depends on an initramfs builder" || bad "no Depends on an initramfs builder"

echo "$fails failed"
[ "$fails" -eq 0 ]
