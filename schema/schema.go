// Package schema holds billing's SQL migrations (schema billing: tables, the SQL API, roles),
// embedded in the binary, and runs them together with River's own migrations.
package schema

import (
	"context"
	"database/sql"
	"embed"
	"fmt"
	"io/fs"
	"log/slog"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/pressly/goose/v3"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/rivermigrate"
)

//go:embed migrations/*.sql
var migrations embed.FS

// Migrations returns billing's migration files, numbered in the order they apply.
func Migrations() fs.FS {
	sub, err := fs.Sub(migrations, "migrations")
	if err != nil {
		panic(err) // the embed pattern above guarantees the directory
	}
	return sub
}

// gooseTable is the table in which goose records billing's applied versions. It lives in
// public because the billing schema does not exist before the first migration.
const gooseTable = "billing_schema_version"

// migrateLockKey serialises concurrent `billingd migrate` runs (several replicas starting
// at once): a session advisory lock held across River's and billing's migrations.
const migrateLockKey int64 = 0x62696c6c696e67 // "billing"

// Result says what a migration run applied.
type Result struct {
	River   []int   // River migration versions applied by this run
	Billing []int64 // billing migration versions applied by this run
}

// Migrate brings River's tables and schema billing up to date. It is idempotent and safe to
// run from several processes at once: runs queue behind one advisory lock, and a run that
// finds everything applied does nothing. The pool's connections must use the schema search
// path that the daemon will use (the default public schema unless configured otherwise).
func Migrate(ctx context.Context, pool *pgxpool.Pool, logger *slog.Logger) (Result, error) {
	var res Result
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return res, fmt.Errorf("acquire connection for migrations: %w", err)
	}
	defer conn.Release()
	if _, err := conn.Exec(ctx, "select pg_advisory_lock($1)", migrateLockKey); err != nil {
		return res, fmt.Errorf("take migration lock: %w", err)
	}
	defer func() {
		// A fresh context: the unlock must happen even when ctx was cancelled.
		_, _ = conn.Exec(context.WithoutCancel(ctx), "select pg_advisory_unlock($1)", migrateLockKey)
	}()

	migrator, err := rivermigrate.New(riverpgxv5.New(pool), &rivermigrate.Config{Logger: logger})
	if err != nil {
		return res, fmt.Errorf("river migrator: %w", err)
	}
	riverRes, err := migrator.Migrate(ctx, rivermigrate.DirectionUp, nil)
	if err != nil {
		return res, fmt.Errorf("river migrations: %w", err)
	}
	for _, v := range riverRes.Versions {
		res.River = append(res.River, v.Version)
	}

	db := stdlib.OpenDBFromPool(pool)
	defer db.Close()
	applied, err := migrateBilling(ctx, db, logger)
	if err != nil {
		return res, err
	}
	res.Billing = applied
	return res, nil
}

func migrateBilling(ctx context.Context, db *sql.DB, logger *slog.Logger) ([]int64, error) {
	provider, err := goose.NewProvider(goose.DialectPostgres, db, Migrations(),
		goose.WithTableName(gooseTable),
		goose.WithDisableGlobalRegistry(true),
		goose.WithSlog(logger),
	)
	if err != nil {
		return nil, fmt.Errorf("billing migrations: %w", err)
	}
	results, err := provider.Up(ctx)
	if err != nil {
		return nil, fmt.Errorf("billing migrations: %w", err)
	}
	var applied []int64
	for _, r := range results {
		applied = append(applied, r.Source.Version)
	}
	return applied, nil
}

// Fingerprint identifies the full set of migrations compiled into this binary (River's and
// billing's). The test helper uses it to name a template database that is reused only while
// the migrations are unchanged.
func Fingerprint() (string, error) {
	return fingerprint(Migrations())
}
