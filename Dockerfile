# syntax=docker/dockerfile:1
# Build: a static binary, modules downloaded in their own cached layer.
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.buildVersion=${VERSION}" -o /out/billingd ./cmd/billingd \
 && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o /out/stripefake ./cmd/stripefake

# Run: distroless static (CA certificates, tzdata, no shell), as the nonroot user.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/billingd /usr/local/bin/billingd
COPY --from=build /out/stripefake /usr/local/bin/stripefake
USER nonroot:nonroot
ENV BILLING_HTTP_ADDR=:8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/billingd", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/billingd"]
CMD ["run"]
