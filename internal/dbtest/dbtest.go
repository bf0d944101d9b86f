// Package dbtest gives each test its own migrated PostgreSQL database.
//
// It uses the server named by TEST_DATABASE_URL, or DATABASE_URL, when either is set. Otherwise
// it starts a throwaway cluster from the installed PostgreSQL binaries (initdb and pg_ctl, found
// through pg_config or under /usr/lib/postgresql) in a temporary directory, so that `go test ./...`
// needs no setup by hand; the cluster is stopped when the test binary exits through Main.
//
// Each call to NewDB clones a fresh database from a template that is migrated once (River's and
// billing's migrations) and reused while the migrations are unchanged, so a test that runs a River
// client, LISTEN/NOTIFY or several connections is fully isolated from every other test.
package dbtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/billingd/billingd/internal/pgtemp"
	"github.com/billingd/billingd/schema"
)

var (
	serverOnce sync.Once
	serverURL  string
	serverErr  error
	cluster    *pgtemp.Cluster

	templateOnce sync.Once
	templateName string
	templateErr  error
)

// Main runs the package's tests and then stops the throwaway cluster, if one was started.
// Call it from TestMain: func TestMain(m *testing.M) { dbtest.Main(m) }.
func Main(m *testing.M) {
	code := m.Run()
	if cluster != nil {
		if err := cluster.Stop(); err != nil {
			fmt.Fprintln(os.Stderr, "dbtest: stop throwaway cluster:", err)
		}
	}
	os.Exit(code)
}

// ServerURL returns the URL of an administrative database on the test server, starting a
// throwaway cluster first when no server is configured.
func ServerURL(tb testing.TB) string {
	tb.Helper()
	serverOnce.Do(func() {
		if u := os.Getenv("TEST_DATABASE_URL"); u != "" {
			serverURL = u
			return
		}
		if u := os.Getenv("DATABASE_URL"); u != "" {
			serverURL = u
			return
		}
		cluster, serverErr = pgtemp.Start(os.TempDir())
		if serverErr == nil {
			serverURL = cluster.URL("postgres")
		}
	})
	if serverErr != nil {
		tb.Fatalf("dbtest: no PostgreSQL for tests: %v", serverErr)
	}
	return serverURL
}

// NewDB creates a fresh, migrated database for this test and returns its connection URL.
// The database is dropped when the test ends.
func NewDB(tb testing.TB) string {
	tb.Helper()
	admin := ServerURL(tb)
	tpl := template(tb, admin)
	name := "billingd_t_" + randomHex(8)

	ctx := context.Background()
	conn := connect(tb, admin)
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "create database "+pgx.Identifier{name}.Sanitize()+" template "+pgx.Identifier{tpl}.Sanitize()); err != nil {
		tb.Fatalf("dbtest: create database from template: %v", err)
	}
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c, err := pgx.Connect(ctx, admin)
		if err != nil {
			tb.Logf("dbtest: drop %s: %v", name, err)
			return
		}
		defer c.Close(ctx)
		if _, err := c.Exec(ctx, "drop database if exists "+pgx.Identifier{name}.Sanitize()+" with (force)"); err != nil {
			tb.Logf("dbtest: drop %s: %v", name, err)
		}
	})
	return withDatabase(tb, admin, name)
}

// NewPool returns a pool on a fresh, migrated database (see NewDB), closed when the test ends.
func NewPool(tb testing.TB) *pgxpool.Pool {
	tb.Helper()
	return Pool(tb, NewDB(tb))
}

// Pool opens a pool on the given database URL, closed when the test ends.
func Pool(tb testing.TB, dbURL string) *pgxpool.Pool {
	tb.Helper()
	cfg, err := pgxpool.ParseConfig(dbURL)
	if err != nil {
		tb.Fatalf("dbtest: parse url: %v", err)
	}
	if cfg.MaxConns > 20 {
		cfg.MaxConns = 20
	}
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		tb.Fatalf("dbtest: open pool: %v", err)
	}
	tb.Cleanup(pool.Close)
	return pool
}

// template returns the name of the migrated template database, building it on first use.
// Builds from several test processes at once are serialised with an advisory lock.
func template(tb testing.TB, admin string) string {
	tb.Helper()
	templateOnce.Do(func() {
		templateName, templateErr = buildTemplate(admin)
	})
	if templateErr != nil {
		tb.Fatalf("dbtest: template database: %v", templateErr)
	}
	return templateName
}

func buildTemplate(admin string) (string, error) {
	fp, err := schema.Fingerprint()
	if err != nil {
		return "", err
	}
	name := "billingd_tpl_" + fp
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	conn, err := pgx.Connect(ctx, admin)
	if err != nil {
		return "", fmt.Errorf("connect to %s: %w", redact(admin), err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "select pg_advisory_lock(hashtext('billingd-dbtest-template'))"); err != nil {
		return "", err
	}
	defer conn.Exec(context.WithoutCancel(ctx), "select pg_advisory_unlock(hashtext('billingd-dbtest-template'))") //nolint:errcheck

	var exists bool
	if err := conn.QueryRow(ctx, "select exists (select 1 from pg_database where datname = $1)", name).Scan(&exists); err != nil {
		return "", err
	}
	if exists {
		return name, nil
	}
	building := name + "_building"
	if _, err := conn.Exec(ctx, "drop database if exists "+pgx.Identifier{building}.Sanitize()+" with (force)"); err != nil {
		return "", err
	}
	if _, err := conn.Exec(ctx, "create database "+pgx.Identifier{building}.Sanitize()); err != nil {
		return "", err
	}
	u, err := replaceDatabase(admin, building)
	if err != nil {
		return "", err
	}
	pool, err := pgxpool.New(ctx, u)
	if err != nil {
		return "", err
	}
	_, err = schema.Migrate(ctx, pool, slog.New(slog.NewTextHandler(io.Discard, nil)))
	pool.Close()
	if err != nil {
		return "", fmt.Errorf("migrate template: %w", err)
	}
	if _, err := conn.Exec(ctx, "alter database "+pgx.Identifier{building}.Sanitize()+" rename to "+pgx.Identifier{name}.Sanitize()); err != nil {
		return "", err
	}
	return name, nil
}

func connect(tb testing.TB, u string) *pgx.Conn {
	tb.Helper()
	conn, err := pgx.Connect(context.Background(), u)
	if err != nil {
		tb.Fatalf("dbtest: connect to %s: %v", redact(u), err)
	}
	return conn
}

func withDatabase(tb testing.TB, u, db string) string {
	tb.Helper()
	out, err := replaceDatabase(u, db)
	if err != nil {
		tb.Fatalf("dbtest: %v", err)
	}
	return out
}

// replaceDatabase returns the URL u with its database replaced by db. Both URL and keyword/value
// connection strings are accepted.
func replaceDatabase(u, db string) (string, error) {
	if parsed, err := url.Parse(u); err == nil && (parsed.Scheme == "postgres" || parsed.Scheme == "postgresql") {
		parsed.Path = "/" + db
		return parsed.String(), nil
	}
	if _, err := pgx.ParseConfig(u); err != nil {
		return "", fmt.Errorf("parse database url: %w", err)
	}
	return u + " dbname=" + db, nil
}

// redact hides a password in a connection URL so that it never reaches a log line.
func redact(u string) string {
	parsed, err := url.Parse(u)
	if err != nil || parsed.User == nil {
		return u
	}
	if _, ok := parsed.User.Password(); ok {
		parsed.User = url.UserPassword(parsed.User.Username(), "xxxxx")
	}
	return parsed.String()
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

// NewEmptyDB creates an empty database (no migrations) on the server at admin and returns its
// URL; it is dropped when the test ends. For tests of the migrations themselves.
func NewEmptyDB(tb testing.TB, admin string) string {
	tb.Helper()
	name := "billingd_e_" + randomHex(8)
	ctx := context.Background()
	conn := connect(tb, admin)
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "create database "+pgx.Identifier{name}.Sanitize()); err != nil {
		tb.Fatalf("dbtest: create database: %v", err)
	}
	tb.Cleanup(func() {
		c, err := pgx.Connect(context.Background(), admin)
		if err != nil {
			return
		}
		defer c.Close(context.Background())
		_, _ = c.Exec(context.Background(), "drop database if exists "+pgx.Identifier{name}.Sanitize()+" with (force)")
	})
	return withDatabase(tb, admin, name)
}
