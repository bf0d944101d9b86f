package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"runtime/debug"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/billingd/billingd/internal/config"
	"github.com/billingd/billingd/schema"
	"github.com/billingd/billingd/worker"
)

// errUsage is returned after a usage message has been printed.
var errUsage = errors.New("usage")

func exitCode(err error) int {
	if errors.Is(err, errUsage) {
		return 2
	}
	return 1
}

const usage = `billingd charges saved Stripe payment methods when money is due, exactly once.

Usage: billingd <command> [flags]

Commands:
  demo         the whole flow on a throwaway PostgreSQL and an in-process Stripe emulator
  run          run the daemon: jobs, webhooks, recovery links, health and metrics
  migrate      apply River's and billing's migrations (idempotent, safe from several replicas)
  status       what is due, in flight, failed and recovering, at a glance
  setup        start saving a customer's payment method; prints the Stripe-hosted page's URL
  healthcheck  exit 0 when the daemon at BILLING_HTTP_ADDR answers /healthz
  version      print the version

Run "billingd <command> -h" for the settings of a command.
`

// run is the whole program: it returns instead of exiting so that deferred cleanup runs.
func run(ctx context.Context, args []string, env config.Env, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return errUsage
	}
	cmd, rest := args[0], args[1:]
	switch cmd {
	case "demo":
		return cmdDemo(ctx, rest, env, stdout, stderr)
	case "run":
		return cmdRun(ctx, rest, env, stderr)
	case "migrate":
		return cmdMigrate(ctx, rest, env, stdout, stderr)
	case "status":
		return cmdStatus(ctx, rest, env, stdout, stderr)
	case "setup":
		return cmdSetup(ctx, rest, env, stdout, stderr)
	case "healthcheck":
		return cmdHealthcheck(ctx, rest, env, stderr)
	case "version", "-version", "--version":
		fmt.Fprintln(stdout, "billingd", version())
		return nil
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	default:
		fmt.Fprintf(stderr, "billingd: unknown command %q\n\n%s", cmd, usage)
		return errUsage
	}
}

// parse fills cfg from flags and the environment and validates what the command needs.
func parse(cmd string, args []string, env config.Env, stderr io.Writer, need config.Need) (*config.Config, error) {
	cfg := &config.Config{}
	fs := config.NewFlagSet(cmd, cfg, env)
	fs.SetOutput(stderr)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, errUsage
		}
		return nil, errUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "billingd %s: unexpected arguments: %s\n", cmd, strings.Join(fs.Args(), " "))
		return nil, errUsage
	}
	if err := cfg.Validate(need); err != nil {
		return nil, fmt.Errorf("invalid settings: %s", strings.ReplaceAll(err.Error(), "\n", "; "))
	}
	return cfg, nil
}

func newLogger(cfg *config.Config, w io.Writer) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(cfg.LogLevel))
	opts := &slog.HandlerOptions{Level: level}
	if cfg.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// connect opens the pool and checks that the database answers, so that a bad DATABASE_URL
// stops the start with one line instead of a stream of retries.
func connect(ctx context.Context, cfg *config.Config) (*pgxpool.Pool, error) {
	pcfg, err := pgxpool.ParseConfig(cfg.DatabaseURL)
	if err != nil {
		return nil, errors.New("DATABASE_URL: cannot parse the connection string")
	}
	if pcfg.MaxConns < int32(cfg.MaxWorkers)+10 {
		pcfg.MaxConns = int32(cfg.MaxWorkers) + 10
	}
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return nil, fmt.Errorf("DATABASE_URL: %w", err)
	}
	pingCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := pool.Ping(pingCtx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("DATABASE_URL: cannot reach the database at %s: %w", pcfg.ConnConfig.Host, unwrapConnErr(err))
	}
	return pool, nil
}

// unwrapConnErr keeps the last, most specific part of a connection error on one line.
func unwrapConnErr(err error) error {
	msg := err.Error()
	if i := strings.LastIndex(msg, ": "); i >= 0 && i+2 < len(msg) {
		msg = msg[i+2:]
	}
	return errors.New(strings.ReplaceAll(msg, "\n", " "))
}

func cmdRun(ctx context.Context, args []string, env config.Env, stderr io.Writer) error {
	cfg, err := parse("run", args, env, stderr, config.NeedDatabase|config.NeedStripe|config.NeedHTTP)
	if err != nil {
		return err
	}
	logger := newLogger(cfg, stderr)
	pool, err := connect(ctx, cfg)
	if err != nil {
		return err
	}
	defer pool.Close()
	if err := checkMigrated(ctx, pool); err != nil {
		return err
	}
	if err := schema.SetAdhocCeiling(ctx, pool, cfg.AdhocCeiling); err != nil {
		return err
	}
	d, err := worker.New(cfg, pool, logger)
	if err != nil {
		return err
	}
	return d.Run(ctx)
}

// checkMigrated refuses to start against a database that `billingd migrate` has not prepared.
func checkMigrated(ctx context.Context, pool *pgxpool.Pool) error {
	var ok bool
	err := pool.QueryRow(ctx, `select to_regclass('river_job') is not null and to_regclass('billing.charges') is not null`).Scan(&ok)
	if err != nil {
		return fmt.Errorf("check schema: %w", err)
	}
	if !ok {
		return errors.New("the database has no billing schema: run `billingd migrate` first")
	}
	return nil
}

func cmdMigrate(ctx context.Context, args []string, env config.Env, stdout, stderr io.Writer) error {
	cfg, err := parse("migrate", args, env, stderr, config.NeedDatabase)
	if err != nil {
		return err
	}
	logger := newLogger(cfg, stderr)
	pool, err := connect(ctx, cfg)
	if err != nil {
		return err
	}
	defer pool.Close()
	res, err := schema.Migrate(ctx, pool, logger)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "migrated: %d River and %d billing migrations applied\n", len(res.River), len(res.Billing))
	return nil
}

func cmdHealthcheck(ctx context.Context, args []string, env config.Env, stderr io.Writer) error {
	cfg, err := parse("healthcheck", args, env, stderr, config.NeedHTTP)
	if err != nil {
		return err
	}
	addr := cfg.HTTPAddr
	if strings.HasPrefix(addr, ":") {
		addr = "127.0.0.1" + addr
	}
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/healthz", nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("healthcheck: %w", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("healthcheck: /healthz answered %s", resp.Status)
	}
	return nil
}

// buildVersion is set at link time (-ldflags "-X main.buildVersion=v1.2.3"; the Dockerfile passes
// its VERSION build argument), where the build has no module version or VCS information.
var buildVersion string

func version() string {
	if buildVersion != "" {
		return buildVersion
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		if bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			return bi.Main.Version
		}
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				return s.Value
			}
		}
	}
	return "dev"
}
