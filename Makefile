# make deb: the carwash-gateway Debian package (amd64 here for testing, arm64 on a Pi; same recipe).
.PHONY: deb lint-deb clean-deb

deb:
	dpkg-buildpackage -us -uc -b
	mkdir -p dist && mv ../carwash-gateway_*.deb dist/ && rm -f ../carwash-gateway_*.buildinfo ../carwash-gateway_*.changes
	@ls -l dist/*.deb

lint-deb: deb
	lintian --no-tag-display-limit dist/carwash-gateway_*.deb

clean-deb:
	rm -rf dist debian/carwash-gateway debian/.debhelper debian/files debian/*.substvars debian/*.debhelper debian/*.debhelper.log debian/debhelper-build-stamp
