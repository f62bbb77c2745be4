# `make install [DESTDIR=…] [PREFIX=/usr] [BINARY=…]`: the same as scripts/install (see there).
PREFIX ?= /usr
BINARY ?= target/x86_64-unknown-linux-musl/release/initcrypt

.PHONY: install deb
install:
	scripts/install --destdir "$(DESTDIR)" --prefix "$(PREFIX)" --binary "$(BINARY)"

# target/debian/initcrypt_<version>_amd64.deb
deb:
	scripts/package-deb --binary "$(BINARY)"
