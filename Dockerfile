# lfsorch itself, for CI runners that mount the Docker socket:
#   docker build --build-arg BASE=lfsorch/base:bookworm -t lfsorch/lfsorch:latest .
#   docker run --rm -v /var/run/docker.sock:/var/run/docker.sock lfsorch/lfsorch images build
# The workspace and the partition must be at the same path inside and out (the engine mounts
# them into build containers by the path lfsorch gives it); lfsorch checks this before a run:
#   docker run --rm -v /var/run/docker.sock:/var/run/docker.sock \
#     -v /srv/lfsorch:/srv/lfsorch -e LFSORCH_HOME=/srv/lfsorch -v /srv/lfs:/srv/lfs \
#     -v "$PWD/stages:/stages" lfsorch/lfsorch run /stages/ch6.yaml --lfs /srv/lfs
# The base defaults to the local (possibly debootstrapped) image so that no registry is needed.
ARG BASE=lfsorch/base:bookworm
FROM ${BASE}

ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/lfsorch/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LFSORCH_HOME=/var/lib/lfsorch

# Behind a TLS-intercepting proxy pip cannot reach PyPI; pass the proxy's CA (PEM text):
#   --build-arg EXTRA_CA_CERT="$(cat /usr/local/share/ca-certificates/proxy.crt)"
# pip then uses the system bundle instead of its own, which lacks such CAs.
ARG EXTRA_CA_CERT=""
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt

# python3-venv: Debian marks its python "externally managed", so lfsorch gets its own venv.
# debootstrap: `lfsorch images bootstrap` works from here too (needs --privileged).
# diffoscope-minimal (and xxd, its hex dumps): where inside two files verify-reproducible
# finds them differing.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates debootstrap python3 python3-venv \
        diffoscope-minimal xxd \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && if [ -n "$EXTRA_CA_CERT" ]; then \
        printf '%s\n' "$EXTRA_CA_CERT" > /usr/local/share/ca-certificates/extra.crt \
        && update-ca-certificates; \
    fi

# Dependencies first, from pyproject alone, so editing the code does not reinstall them; the
# build backend too, so installing the code below needs no isolated build environment (that
# would fetch setuptools from the index on every code change).
WORKDIR /opt/lfsorch/src
COPY pyproject.toml ./
RUN python3 -m venv /opt/lfsorch/venv \
 && python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb")); print("\n".join(p["project"]["dependencies"] + p["build-system"]["requires"]))' > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# Editable, so lfsorch finds images/ and stages/ next to its package as in a checkout.
COPY . ./
RUN pip install --no-deps --no-build-isolation -e . \
 && lfsorch --help >/dev/null

ENTRYPOINT ["lfsorch"]
CMD ["--help"]
