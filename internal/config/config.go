// Package config holds billingd's settings: one struct, filled from command-line flags whose
// defaults come from the environment, and validated before anything connects.
package config

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/robfig/cron/v3"
)

// Config is every setting of `billingd run`. Each field has a flag and an environment variable;
// the flag wins, the environment gives the default.
type Config struct {
	DatabaseURL         string
	StripeSecretKey     string
	StripeWebhookSecret string
	StripeAPIBase       string
	HTTPAddr            string
	PublicURL           string

	LogLevel  string
	LogFormat string

	MaxWorkers      int
	SoftStopTimeout time.Duration
	FetchCooldown   time.Duration

	DueSchedule       string
	ReconcileSchedule string
	DueBatchSize      int

	StripeRPS        float64
	StripeMaxRetries int

	// Charging (jobs/charge.go, jobs/decline.go, jobs/reconcile.go).
	ChargeBackoff      time.Duration
	ChargeMaxTries     int
	ReconcileAfter     time.Duration
	DeclineMaxRetries  int
	DeclineCardLimit   int
	RetryCalendar      string
	RetryQuickCalendar string
	DeclineNeverRetry  string
	DeclineRetryLater  string
	DeclineRetrySoon   string

	RecoverySuccessURL string
	RecoveryCancelURL  string
	SetupSuccessURL    string
	SetupCancelURL     string

	// StripeCustomerModel is how customers exist at Stripe: "customer" (Customers v1, the
	// default) or "account" (Accounts v2 customer-configured Accounts, sent as customer_account
	// with AddExtra since stripe-go v82 has no field for it).
	StripeCustomerModel string

	SMTPURL        string
	EmailFrom      string
	NotifyURL      string
	NotifySecret   string
	RiverUIUser    string
	RiverUIPass    string
	AdhocCeiling   int64
	EnableRiverUI  bool
	RecoveryWindow time.Duration

	RecoverySchedule            string
	RecoveryReminderInterval    time.Duration
	RecoveryPlanOnUncollectible string

	// WebhookRetention is how long stored webhook events are kept once ingested.
	WebhookRetention time.Duration

	// envErrs holds environment values that could not be parsed; Validate reports them.
	envErrs []error
}

// Setting describes one setting for the flag set and for `billingd run -h`.
type setting struct {
	flag, env, usage string
}

// Env is the environment lookup used for flag defaults; tests pass their own.
type Env func(string) string

// NewFlagSet returns a flag set for `billingd <cmd>` bound to cfg, with defaults read through env.
// Every setting is listed with its environment variable in the flag's usage text.
func NewFlagSet(cmd string, cfg *Config, env Env) *flag.FlagSet {
	fs := flag.NewFlagSet("billingd "+cmd, flag.ContinueOnError)
	str := func(p *string, name, envName, def, usage string) {
		fs.StringVar(p, name, or(env(envName), def), usage+" ($"+envName+")")
	}
	// Settings that may carry a secret never show their value as a default in -h.
	secretVar := func(p *string, name, envName, usage string) {
		*p = env(envName)
		fs.Var((*secret)(p), name, usage+" ($"+envName+")")
	}
	secretVar(&cfg.DatabaseURL, "database-url", "DATABASE_URL", "PostgreSQL connection `URL` (required)")
	secretVar(&cfg.StripeSecretKey, "stripe-secret-key", "STRIPE_SECRET_KEY", "Stripe secret or restricted `key`, sk_... or rk_... (required for run)")
	secretVar(&cfg.StripeWebhookSecret, "stripe-webhook-secret", "STRIPE_WEBHOOK_SECRET", "signing `secret` of the webhook endpoint, whsec_... (required for run)")
	str(&cfg.StripeAPIBase, "stripe-api-base", "STRIPE_API_BASE", "https://api.stripe.com", "base URL of the Stripe API (a stripefake URL in tests and the demo)")
	str(&cfg.HTTPAddr, "http-addr", "BILLING_HTTP_ADDR", ":8080", "address of the HTTP server (webhooks, recovery links, health, metrics)")
	str(&cfg.PublicURL, "public-url", "BILLING_PUBLIC_URL", "http://localhost:8080", "public base URL of this server, used in recovery links")
	str(&cfg.LogLevel, "log-level", "BILLING_LOG_LEVEL", "info", "debug, info, warn or error")
	str(&cfg.LogFormat, "log-format", "BILLING_LOG_FORMAT", "text", "text or json")
	intVar(cfg, fs, &cfg.MaxWorkers, "max-workers", "BILLING_MAX_WORKERS", 20, "concurrent charge jobs per replica", env)
	durVar(cfg, fs, &cfg.SoftStopTimeout, "soft-stop-timeout", "BILLING_SOFT_STOP_TIMEOUT", 30*time.Second, "on SIGTERM, how long running jobs may finish before they are cancelled", env)
	durVar(cfg, fs, &cfg.FetchCooldown, "fetch-cooldown", "BILLING_FETCH_COOLDOWN", 20*time.Millisecond, "River's minimum pause between job fetches (lower: more throughput, more queries)", env)
	str(&cfg.DueSchedule, "due-schedule", "BILLING_DUE_SCHEDULE", "* * * * *", "cron schedule (robfig, CRON_TZ= allowed) of the due computation")
	str(&cfg.ReconcileSchedule, "reconcile-schedule", "BILLING_RECONCILE_SCHEDULE", "*/5 * * * *", "cron schedule of the reconcile job that settles unknown outcomes")
	intVar(cfg, fs, &cfg.DueBatchSize, "due-batch-size", "BILLING_DUE_BATCH_SIZE", 5000, "due rows locked and charged per transaction", env)
	floatVar(cfg, fs, &cfg.StripeRPS, "stripe-rps", "BILLING_STRIPE_RPS", 20, "requests per second to Stripe across all replicas together (Stripe allows 100 live, 25 test)", env)
	intVar(cfg, fs, &cfg.StripeMaxRetries, "stripe-max-network-retries", "BILLING_STRIPE_MAX_NETWORK_RETRIES", 2, "stripe-go's own retries of a dropped connection (same idempotency key)", env)
	durVar(cfg, fs, &cfg.ChargeBackoff, "charge-backoff", "BILLING_CHARGE_BACKOFF", time.Second, "first wait before a charge call that failed transiently is retried with the same idempotency key (doubles up to 5m)", env)
	intVar(cfg, fs, &cfg.ChargeMaxTries, "charge-max-tries", "BILLING_CHARGE_MAX_TRIES", 10, "calls made with one idempotency key before its outcome is left to the reconcile job", env)
	durVar(cfg, fs, &cfg.ReconcileAfter, "reconcile-after", "BILLING_RECONCILE_AFTER", 2*time.Minute, "age of an in-flight charge attempt (or a stalled pending charge) before the reconcile job settles it from Stripe", env)
	intVar(cfg, fs, &cfg.DeclineMaxRetries, "decline-max-retries", "BILLING_DECLINE_MAX_RETRIES", 8, "automatic retries of a soft-declined charge, 0-8 (Stripe advises at most 8)", env)
	intVar(cfg, fs, &cfg.DeclineCardLimit, "decline-card-limit", "BILLING_DECLINE_CARD_LIMIT", 15, "declines of one card in 30 days after which it is not retried automatically, 1-15 (card networks)", env)
	str(&cfg.RetryCalendar, "retry-calendar", "BILLING_RETRY_CALENDAR", "24h,48h,48h,72h,72h,72h,96h,96h", "waits before the 1st, 2nd, ... automatic retry of a soft decline (the last repeats)")
	str(&cfg.RetryQuickCalendar, "retry-quick-calendar", "BILLING_RETRY_QUICK_CALENDAR", "1h,6h,24h,48h,72h,72h,96h,96h", "the same for momentary declines (processing_error, try_again_later, ...)")
	str(&cfg.DeclineNeverRetry, "decline-never-retry", "BILLING_DECLINE_NEVER_RETRY", "", "extra decline codes never retried automatically, comma-separated")
	str(&cfg.DeclineRetryLater, "decline-retry-later", "BILLING_DECLINE_RETRY_LATER", "", "extra decline codes retried on the retry calendar, comma-separated")
	str(&cfg.DeclineRetrySoon, "decline-retry-soon", "BILLING_DECLINE_RETRY_SOON", "", "extra decline codes retried on the quick calendar, comma-separated")
	str(&cfg.RecoverySuccessURL, "recovery-success-url", "BILLING_RECOVERY_SUCCESS_URL", "", "where Checkout sends a customer who paid a recovery session (default: <public-url>/recover/done)")
	str(&cfg.RecoveryCancelURL, "recovery-cancel-url", "BILLING_RECOVERY_CANCEL_URL", "", "where Checkout sends a customer who left a recovery session (default: <public-url>/recover/canceled)")
	str(&cfg.SetupSuccessURL, "setup-success-url", "BILLING_SETUP_SUCCESS_URL", "", "where Checkout sends a customer who saved a card (default: <public-url>/setup/done)")
	str(&cfg.SetupCancelURL, "setup-cancel-url", "BILLING_SETUP_CANCEL_URL", "", "where Checkout sends a customer who left the setup page (default: <public-url>/setup/canceled)")
	str(&cfg.StripeCustomerModel, "stripe-customer-model", "BILLING_STRIPE_CUSTOMER_MODEL", "customer", "customer (Stripe Customers v1) or account (Accounts v2 customer_account, preview; see the README)")
	secretVar(&cfg.SMTPURL, "smtp-url", "BILLING_SMTP_URL", "SMTP server for customer email, as a `URL`: smtp://user:pass@host:587 (STARTTLS required; ?starttls=opportunistic or ?starttls=off to relax) or smtps://user:pass@host:465 (empty: no email)")
	str(&cfg.EmailFrom, "email-from", "BILLING_EMAIL_FROM", "billing@localhost", "From address of customer email")
	str(&cfg.NotifyURL, "notify-url", "BILLING_NOTIFY_URL", "", "URL of the host application that receives signed notification POSTs (empty: none)")
	secretVar(&cfg.NotifySecret, "notify-secret", "BILLING_NOTIFY_SECRET", "HMAC-SHA256 `key` that signs notification POSTs (required with -notify-url)")
	str(&cfg.RiverUIUser, "riverui-user", "BILLING_RIVERUI_USER", "", "basic-auth user for /riverui/ (River UI is off unless user and password are set)")
	secretVar(&cfg.RiverUIPass, "riverui-password", "BILLING_RIVERUI_PASSWORD", "basic-auth `password` for /riverui/")
	int64Var(cfg, fs, &cfg.AdhocCeiling, "adhoc-ceiling", "BILLING_ADHOC_CEILING", 1_000_000, "largest ad-hoc charge finance may enqueue, in minor units (stored in the database at start)", env)
	durVar(cfg, fs, &cfg.RecoveryWindow, "recovery-window", "BILLING_RECOVERY_WINDOW", 14*24*time.Hour, "how long a failed charge may be paid through recovery before it is uncollectible", env)
	str(&cfg.RecoverySchedule, "recovery-schedule", "BILLING_RECOVERY_SCHEDULE", "*/10 * * * *", "cron schedule of the recovery sweep that sends reminders and writes off charges past the recovery window")
	durVar(cfg, fs, &cfg.RecoveryReminderInterval, "recovery-reminder-interval", "BILLING_RECOVERY_REMINDER_INTERVAL", 72*time.Hour, "time between reminders while a failed charge is unpaid (0: no reminders)", env)
	durVar(cfg, fs, &cfg.WebhookRetention, "webhook-retention", "BILLING_WEBHOOK_RETENTION", 30*24*time.Hour, "how long ingested webhook events (their payloads, customer details included) are kept before an hourly job deletes them; at least 72h, Stripe's retry window", env)
	str(&cfg.RecoveryPlanOnUncollectible, "recovery-plan-on-uncollectible", "BILLING_RECOVERY_PLAN_ON_UNCOLLECTIBLE", "pause", "when an installment becomes uncollectible: pause the rest of its plan, or continue charging it")
	return fs
}

// The flag helpers keep a malformed environment value visible: it becomes the flag's default
// text and is rejected by Validate with the variable's name, not silently replaced.

func intVar(cfg *Config, fs *flag.FlagSet, p *int, name, envName string, def int, usage string, env Env) {
	*p = def
	if v := env(envName); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil {
			cfg.envErrs = append(cfg.envErrs, fmt.Errorf("%s=%q is not an integer", envName, v))
		} else {
			*p = n
		}
	}
	fs.IntVar(p, name, *p, usage+" ($"+envName+")")
}

func int64Var(cfg *Config, fs *flag.FlagSet, p *int64, name, envName string, def int64, usage string, env Env) {
	*p = def
	if v := env(envName); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			cfg.envErrs = append(cfg.envErrs, fmt.Errorf("%s=%q is not an integer", envName, v))
		} else {
			*p = n
		}
	}
	fs.Int64Var(p, name, *p, usage+" ($"+envName+")")
}

func floatVar(cfg *Config, fs *flag.FlagSet, p *float64, name, envName string, def float64, usage string, env Env) {
	*p = def
	if v := env(envName); v != "" {
		n, err := strconv.ParseFloat(v, 64)
		if err != nil {
			cfg.envErrs = append(cfg.envErrs, fmt.Errorf("%s=%q is not a number", envName, v))
		} else {
			*p = n
		}
	}
	fs.Float64Var(p, name, *p, usage+" ($"+envName+")")
}

func durVar(cfg *Config, fs *flag.FlagSet, p *time.Duration, name, envName string, def time.Duration, usage string, env Env) {
	*p = def
	if v := env(envName); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			cfg.envErrs = append(cfg.envErrs, fmt.Errorf("%s=%q is not a duration (like 30s or 5m)", envName, v))
		} else {
			*p = d
		}
	}
	fs.DurationVar(p, name, *p, usage+" ($"+envName+")")
}

// secret is a string flag whose value is never printed: -h shows no default for it.
type secret string

func (s *secret) String() string     { return "" }
func (s *secret) Set(v string) error { *s = secret(v); return nil }

func or(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// Need says which groups of settings a command requires.
type Need int

const (
	// NeedDatabase requires DATABASE_URL.
	NeedDatabase Need = 1 << iota
	// NeedStripe requires the Stripe key and webhook secret.
	NeedStripe
	// NeedHTTP requires a valid HTTP address and public URL.
	NeedHTTP
)

// Validate checks every setting that the command needs and returns one error naming each
// missing or malformed setting, before anything connects. Secrets are never echoed.
func (c *Config) Validate(need Need) error {
	errs := append([]error(nil), c.envErrs...)
	if need&NeedDatabase != 0 {
		if c.DatabaseURL == "" {
			errs = append(errs, errors.New("DATABASE_URL (-database-url) is not set"))
		} else if err := checkDatabaseURL(c.DatabaseURL); err != nil {
			errs = append(errs, err)
		}
	}
	if need&NeedStripe != 0 {
		switch {
		case c.StripeSecretKey == "":
			errs = append(errs, errors.New("STRIPE_SECRET_KEY (-stripe-secret-key) is not set"))
		case !strings.HasPrefix(c.StripeSecretKey, "sk_") && !strings.HasPrefix(c.StripeSecretKey, "rk_"):
			errs = append(errs, errors.New("STRIPE_SECRET_KEY must be a secret key (sk_...) or a restricted key (rk_...), not a publishable key"))
		}
		switch {
		case c.StripeWebhookSecret == "":
			errs = append(errs, errors.New("STRIPE_WEBHOOK_SECRET (-stripe-webhook-secret) is not set"))
		case !strings.HasPrefix(c.StripeWebhookSecret, "whsec_"):
			errs = append(errs, errors.New("STRIPE_WEBHOOK_SECRET must start with whsec_"))
		}
		if err := checkHTTPURL("STRIPE_API_BASE", c.StripeAPIBase); err != nil {
			errs = append(errs, err)
		}
		if c.StripeRPS <= 0 {
			errs = append(errs, errors.New("BILLING_STRIPE_RPS must be positive"))
		}
		if c.StripeMaxRetries < 0 {
			errs = append(errs, errors.New("BILLING_STRIPE_MAX_NETWORK_RETRIES must not be negative"))
		}
		if c.StripeCustomerModel != "customer" && c.StripeCustomerModel != "account" {
			errs = append(errs, fmt.Errorf("BILLING_STRIPE_CUSTOMER_MODEL=%q must be customer or account", c.StripeCustomerModel))
		}
	}
	if need&NeedHTTP != 0 {
		if _, _, err := net.SplitHostPort(c.HTTPAddr); err != nil {
			errs = append(errs, fmt.Errorf("BILLING_HTTP_ADDR=%q is not host:port", c.HTTPAddr))
		}
		if err := checkHTTPURL("BILLING_PUBLIC_URL", c.PublicURL); err != nil {
			errs = append(errs, err)
		}
		for name, v := range map[string]string{
			"BILLING_RECOVERY_SUCCESS_URL": c.RecoverySuccessURL, "BILLING_RECOVERY_CANCEL_URL": c.RecoveryCancelURL,
			"BILLING_SETUP_SUCCESS_URL": c.SetupSuccessURL, "BILLING_SETUP_CANCEL_URL": c.SetupCancelURL,
			"BILLING_NOTIFY_URL": c.NotifyURL,
		} {
			if v != "" {
				if err := checkHTTPURL(name, v); err != nil {
					errs = append(errs, err)
				}
			}
		}
		if c.NotifyURL != "" && c.NotifySecret == "" {
			errs = append(errs, errors.New("BILLING_NOTIFY_SECRET is required when BILLING_NOTIFY_URL is set"))
		}
		if c.SMTPURL != "" {
			if _, err := ParseSMTPURL(c.SMTPURL); err != nil {
				errs = append(errs, err)
			}
		}
		if (c.RiverUIUser == "") != (c.RiverUIPass == "") {
			errs = append(errs, errors.New("BILLING_RIVERUI_USER and BILLING_RIVERUI_PASSWORD must be set together"))
		}
	}
	if c.MaxWorkers < 1 || c.MaxWorkers > 10000 {
		errs = append(errs, fmt.Errorf("BILLING_MAX_WORKERS=%d must be between 1 and 10000", c.MaxWorkers))
	}
	if c.SoftStopTimeout <= 0 {
		errs = append(errs, errors.New("BILLING_SOFT_STOP_TIMEOUT must be positive"))
	}
	if c.FetchCooldown < time.Millisecond {
		errs = append(errs, errors.New("BILLING_FETCH_COOLDOWN must be at least 1ms"))
	}
	if c.DueBatchSize < 1 {
		errs = append(errs, errors.New("BILLING_DUE_BATCH_SIZE must be at least 1"))
	}
	if c.AdhocCeiling < 1 {
		errs = append(errs, errors.New("BILLING_ADHOC_CEILING must be positive"))
	}
	if c.ChargeBackoff < time.Millisecond {
		errs = append(errs, errors.New("BILLING_CHARGE_BACKOFF must be at least 1ms"))
	}
	if c.ChargeMaxTries < 1 {
		errs = append(errs, errors.New("BILLING_CHARGE_MAX_TRIES must be at least 1"))
	}
	if c.ReconcileAfter < time.Second {
		errs = append(errs, errors.New("BILLING_RECONCILE_AFTER must be at least 1s"))
	}
	if c.DeclineMaxRetries < 0 || c.DeclineMaxRetries > 8 {
		errs = append(errs, fmt.Errorf("BILLING_DECLINE_MAX_RETRIES=%d must be between 0 and 8", c.DeclineMaxRetries))
	}
	if c.DeclineCardLimit < 1 || c.DeclineCardLimit > 15 {
		errs = append(errs, fmt.Errorf("BILLING_DECLINE_CARD_LIMIT=%d must be between 1 and 15", c.DeclineCardLimit))
	}
	for name, v := range map[string]string{"BILLING_RETRY_CALENDAR": c.RetryCalendar, "BILLING_RETRY_QUICK_CALENDAR": c.RetryQuickCalendar} {
		if _, err := ParseDurations(v); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", name, err))
		}
	}
	if c.RecoveryWindow <= 0 {
		errs = append(errs, errors.New("BILLING_RECOVERY_WINDOW must be positive"))
	}
	if c.WebhookRetention < 72*time.Hour {
		errs = append(errs, fmt.Errorf("BILLING_WEBHOOK_RETENTION=%s must be at least 72h: Stripe retries a delivery for up to three days, and a stored event is what makes a retry a duplicate", c.WebhookRetention))
	}
	if c.RecoveryReminderInterval < 0 {
		errs = append(errs, errors.New("BILLING_RECOVERY_REMINDER_INTERVAL must not be negative (0 turns reminders off)"))
	}
	switch c.RecoveryPlanOnUncollectible {
	case "pause", "continue":
	default:
		errs = append(errs, fmt.Errorf("BILLING_RECOVERY_PLAN_ON_UNCOLLECTIBLE=%q must be pause or continue", c.RecoveryPlanOnUncollectible))
	}
	for name, expr := range map[string]string{"BILLING_DUE_SCHEDULE": c.DueSchedule, "BILLING_RECONCILE_SCHEDULE": c.ReconcileSchedule, "BILLING_RECOVERY_SCHEDULE": c.RecoverySchedule} {
		if err := checkCron(expr); err != nil {
			errs = append(errs, fmt.Errorf("%s=%q is not a cron schedule: %v", name, expr, err))
		}
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		errs = append(errs, fmt.Errorf("BILLING_LOG_LEVEL=%q must be debug, info, warn or error", c.LogLevel))
	}
	switch c.LogFormat {
	case "text", "json":
	default:
		errs = append(errs, fmt.Errorf("BILLING_LOG_FORMAT=%q must be text or json", c.LogFormat))
	}
	return errors.Join(errs...)
}

// checkCron parses a schedule as the daemon will (cron.ParseStandard). robfig/cron v3.0.1 panics
// on a CRON_TZ= prefix with no schedule after it; that is reported as an error here instead.
func checkCron(expr string) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = errors.New("CRON_TZ= must be followed by a space and the schedule")
		}
	}()
	_, err = cron.ParseStandard(expr)
	return err
}

func checkDatabaseURL(s string) error {
	if strings.HasPrefix(s, "postgres://") || strings.HasPrefix(s, "postgresql://") {
		if _, err := url.Parse(s); err != nil {
			return errors.New("DATABASE_URL is not a valid URL")
		}
		return nil
	}
	if strings.Contains(s, "=") {
		return nil // keyword/value form, checked by pgx when it parses
	}
	return errors.New("DATABASE_URL must be a postgres:// URL or a keyword=value connection string")
}

func checkHTTPURL(name, s string) error {
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("%s=%q must be an http(s) URL", name, s)
	}
	return nil
}

// ParseDurations parses a comma-separated list of durations (like "1h,24h,48h"), each at least
// a minute.
func ParseDurations(s string) ([]time.Duration, error) {
	var out []time.Duration
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		d, err := time.ParseDuration(part)
		if err != nil {
			return nil, fmt.Errorf("%q is not a duration (like 24h)", part)
		}
		if d < time.Minute {
			return nil, fmt.Errorf("%s is under a minute", part)
		}
		out = append(out, d)
	}
	return out, nil
}

// SplitList splits a comma-separated list, dropping blanks.
func SplitList(s string) []string {
	var out []string
	for _, part := range strings.Split(s, ",") {
		if part = strings.TrimSpace(part); part != "" {
			out = append(out, part)
		}
	}
	return out
}

// OSEnv reads the process environment.
func OSEnv(name string) string { return os.Getenv(name) }
