package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/exec"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/billingd/billingd/internal/pgtemp"
)

// demoDB is the database the demo runs on and how to give it back.
type demoDB struct {
	URL     string
	About   string       // one line for the progress output
	Cleanup func() error // stops or drops what the demo created; nil when there is nothing to undo
}

// Queries of the demo's database provisioning.
const (
	// demoDBTables tells which of River's and billing's tables a database has; demoDBJobs and
	// demoDBCustomers whether they hold rows, which a demo daemon must never work (it would
	// settle them against the emulator).
	demoDBTables    = `select to_regclass('river_job') is not null, to_regclass('billing.customers') is not null`
	demoDBJobs      = `select exists (select 1 from river_job)`
	demoDBCustomers = `select exists (select 1 from billing.customers)`
)

// provisionDemoDB gives the demo a database. With no DATABASE_URL it starts a throwaway
// PostgreSQL cluster from the installed server binaries (installing them with apt-get first when
// none exist and the demo runs as root on a machine with apt-get). With DATABASE_URL it creates a
// fresh database on that server, dropped at the end; when the role may not create databases it
// uses the named database itself, but only if it holds no billing data and no River jobs.
func provisionDemoDB(ctx context.Context, databaseURL string, stderr io.Writer) (*demoDB, error) {
	if databaseURL == "" {
		return startThrowawayCluster(ctx, stderr)
	}
	return freshDatabase(ctx, databaseURL)
}

func startThrowawayCluster(ctx context.Context, stderr io.Writer) (*demoDB, error) {
	cluster, err := pgtemp.Start(os.TempDir())
	if errors.Is(err, pgtemp.ErrNoBinaries) {
		if !canAptInstall() {
			return nil, fmt.Errorf("no PostgreSQL server binaries (initdb, pg_ctl) found and DATABASE_URL is not set; install them with: %s", installAdvice(exec.LookPath))
		}
		fmt.Fprintln(stderr, "billingd demo: no PostgreSQL server binaries found; installing the postgresql package with apt-get")
		if err := aptInstallPostgres(ctx, stderr); err != nil {
			return nil, fmt.Errorf("install PostgreSQL with apt-get: %w; install it by hand with: apt-get install -y postgresql", err)
		}
		cluster, err = pgtemp.Start(os.TempDir())
	}
	if err != nil {
		return nil, fmt.Errorf("start a throwaway PostgreSQL: %w", err)
	}
	return &demoDB{
		URL:     cluster.URL("postgres"),
		About:   fmt.Sprintf("throwaway PostgreSQL at 127.0.0.1:%d", cluster.Port),
		Cleanup: cluster.Stop,
	}, nil
}

// canAptInstall reports whether the demo may install PostgreSQL itself: as root, with apt-get.
func canAptInstall() bool {
	if os.Geteuid() != 0 {
		return false
	}
	_, err := exec.LookPath("apt-get")
	return err == nil
}

// aptInstallPostgres installs Debian's postgresql package, quietly, reporting on stderr.
func aptInstallPostgres(ctx context.Context, stderr io.Writer) error {
	for _, args := range [][]string{{"update", "-qq"}, {"install", "-y", "-qq", "--no-install-recommends", "postgresql"}} {
		cmd := exec.CommandContext(ctx, "apt-get", args...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		cmd.Stdout, cmd.Stderr = io.Discard, stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("apt-get %s: %w", args[0], err)
		}
	}
	return nil
}

// installAdvice is the one command that installs PostgreSQL's server on this machine, as far
// as its package manager tells.
func installAdvice(lookPath func(string) (string, error)) string {
	sudo := ""
	if os.Geteuid() != 0 {
		sudo = "sudo "
	}
	for _, pm := range []struct{ bin, cmd string }{
		{"apt-get", "apt-get install -y postgresql"},
		{"dnf", "dnf install -y postgresql-server"},
		{"yum", "yum install -y postgresql-server"},
		{"apk", "apk add postgresql"},
		{"pacman", "pacman -S --noconfirm postgresql"},
		{"zypper", "zypper install -y postgresql-server"},
	} {
		if _, err := lookPath(pm.bin); err == nil {
			return sudo + pm.cmd
		}
	}
	if _, err := lookPath("brew"); err == nil {
		return "brew install postgresql"
	}
	return "your system's package manager (the PostgreSQL server package), or set DATABASE_URL to a server you have"
}

// freshDatabase creates a database of its own on the server of databaseURL, or falls back to
// the named database when it is safe to use.
func freshDatabase(ctx context.Context, databaseURL string) (*demoDB, error) {
	connectCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(connectCtx, databaseURL)
	if err != nil {
		return nil, fmt.Errorf("DATABASE_URL: cannot connect: %w", unwrapConnErr(err))
	}
	defer conn.Close(context.WithoutCancel(ctx))

	name := "billingd_demo_" + randomHex(6)
	_, err = conn.Exec(ctx, "create database "+pgx.Identifier{name}.Sanitize())
	if err == nil {
		u, err := withDatabase(databaseURL, name)
		if err != nil {
			return nil, err
		}
		return &demoDB{
			URL:   u,
			About: fmt.Sprintf("fresh database %s on the DATABASE_URL server (dropped at the end)", name),
			Cleanup: func() error {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				c, err := pgx.Connect(ctx, databaseURL)
				if err != nil {
					return err
				}
				defer c.Close(ctx)
				_, err = c.Exec(ctx, "drop database if exists "+pgx.Identifier{name}.Sanitize()+" with (force)")
				return err
			},
		}, nil
	}
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "42501" {
		return nil, fmt.Errorf("create a database for the demo: %w", err)
	}

	// No CREATEDB: the named database itself, if nothing in it could be worked by mistake.
	db := conn.Config().Database
	cannotTell := func(err error) error {
		return fmt.Errorf("the role may not create a fresh database, and whether database %q holds billing data or River jobs cannot be told (%v): "+
			"point DATABASE_URL at an empty database, or unset it for a throwaway one", db, err)
	}
	var hasRiver, hasBilling, jobs, billing bool
	if err := conn.QueryRow(ctx, demoDBTables).Scan(&hasRiver, &hasBilling); err != nil {
		return nil, cannotTell(err)
	}
	if hasRiver {
		if err := conn.QueryRow(ctx, demoDBJobs).Scan(&jobs); err != nil {
			return nil, cannotTell(err)
		}
	}
	if hasBilling {
		if err := conn.QueryRow(ctx, demoDBCustomers).Scan(&billing); err != nil {
			return nil, cannotTell(err)
		}
	}
	if jobs || billing {
		return nil, fmt.Errorf("database %q already holds billing customers or River jobs, and the role may not create a fresh database: "+
			"the demo's daemon would work them against its Stripe emulator. Point DATABASE_URL at an empty database, or unset it for a throwaway one", db)
	}
	return &demoDB{
		URL:   databaseURL,
		About: fmt.Sprintf("database %s from DATABASE_URL (no CREATEDB; the demo's rows stay there)", db),
	}, nil
}

// openDemoPool opens a pool on the demo database with room for the daemon, the emulator's
// webhooks and the demo's own queries.
func openDemoPool(ctx context.Context, u string) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(u)
	if err != nil {
		return nil, errors.New("cannot parse the demo database's URL")
	}
	cfg.MaxConns = 40
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, err
	}
	pingCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := pool.Ping(pingCtx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("cannot reach the demo database: %w", unwrapConnErr(err))
	}
	return pool, nil
}

// withDatabase returns the connection string u naming database db instead; both URLs and
// keyword/value strings are accepted.
func withDatabase(u, db string) (string, error) {
	if parsed, err := url.Parse(u); err == nil && (parsed.Scheme == "postgres" || parsed.Scheme == "postgresql") {
		parsed.Path = "/" + db
		return parsed.String(), nil
	}
	if _, err := pgx.ParseConfig(u); err != nil {
		return "", errors.New("DATABASE_URL: cannot parse the connection string")
	}
	return u + " dbname=" + db, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // crypto/rand.Read never fails on supported platforms
	return hex.EncodeToString(b)
}
