# The same environment as scripts/setup.sh, in a container: docker build -t switcht5 .
FROM debian:12
WORKDIR /src
COPY . .
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends ca-certificates \
 && SWITCHT5_SKIP_RUN=1 bash scripts/setup.sh \
 && rm -rf /var/lib/apt/lists/*
ENTRYPOINT ["/src/build/switcht5"]
CMD ["--help"]
