package deps

import (
	_ "github.com/jackc/pgx/v5"
	_ "github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/pressly/goose/v3"
	_ "github.com/prometheus/client_golang/prometheus"
	_ "github.com/riverqueue/river"
	_ "github.com/riverqueue/river/riverdriver/riverpgxv5"
	_ "github.com/riverqueue/river/rivermigrate"
	_ "github.com/robfig/cron/v3"
	_ "github.com/stretchr/testify/require"
	_ "github.com/stripe/stripe-go/v82"
	_ "github.com/wneessen/go-mail"
	_ "riverqueue.com/riverui"
)
