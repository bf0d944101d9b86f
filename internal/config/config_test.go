package config

import (
	"bytes"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func parse(t *testing.T, env map[string]string, args ...string) (*Config, string) {
	t.Helper()
	cfg := &Config{}
	fs := NewFlagSet("run", cfg, func(k string) string { return env[k] })
	var out bytes.Buffer
	fs.SetOutput(&out)
	_ = fs.Parse(args)
	return cfg, out.String()
}

var valid = map[string]string{
	"DATABASE_URL":          "postgres://billing:pw@db:5432/billing",
	"STRIPE_SECRET_KEY":     "sk_live_abc",
	"STRIPE_WEBHOOK_SECRET": "whsec_abc",
}

func with(kv ...string) map[string]string {
	m := map[string]string{}
	for k, v := range valid {
		m[k] = v
	}
	for i := 0; i < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return m
}

func TestValidate(t *testing.T) {
	t.Parallel()
	all := NeedDatabase | NeedStripe | NeedHTTP
	cases := []struct {
		name string
		env  map[string]string
		args []string
		want string // substring of the error; empty for valid
	}{
		{"valid defaults", valid, nil, ""},
		{"flag overrides env", with("BILLING_MAX_WORKERS", "x"), []string{"-max-workers", "5"}, `BILLING_MAX_WORKERS="x" is not an integer`},
		{"missing database", with("DATABASE_URL", ""), nil, "DATABASE_URL (-database-url) is not set"},
		{"database not a url", with("DATABASE_URL", "localhost"), nil, "DATABASE_URL must be"},
		{"keyword database string", with("DATABASE_URL", "host=db user=billing"), nil, ""},
		{"publishable key", with("STRIPE_SECRET_KEY", "pk_live_1"), nil, "STRIPE_SECRET_KEY must be a secret key"},
		{"restricted key", with("STRIPE_SECRET_KEY", "rk_live_1"), nil, ""},
		{"webhook secret shape", with("STRIPE_WEBHOOK_SECRET", "abc"), nil, "STRIPE_WEBHOOK_SECRET must start with whsec_"},
		{"api base", with("STRIPE_API_BASE", "ftp://x"), nil, "STRIPE_API_BASE"},
		{"http addr", with("BILLING_HTTP_ADDR", "8080"), nil, "BILLING_HTTP_ADDR"},
		{"duration", with("BILLING_SOFT_STOP_TIMEOUT", "30"), nil, "BILLING_SOFT_STOP_TIMEOUT=\"30\" is not a duration"},
		{"negative timeout", with("BILLING_SOFT_STOP_TIMEOUT", "-1s"), nil, "BILLING_SOFT_STOP_TIMEOUT must be positive"},
		{"cron", with("BILLING_DUE_SCHEDULE", "daily"), nil, "BILLING_DUE_SCHEDULE"},
		{"cron tz", with("BILLING_DUE_SCHEDULE", "CRON_TZ=Europe/Paris 0 9 * * *"), nil, ""},
		{"cron tz without schedule", with("BILLING_DUE_SCHEDULE", "CRON_TZ=Europe/Paris"), nil, "BILLING_DUE_SCHEDULE"},
		{"notify url without secret", with("BILLING_NOTIFY_URL", "https://app/hook"), nil, "BILLING_NOTIFY_SECRET is required"},
		{"smtp url", with("BILLING_SMTP_URL", "mail.example.com:25"), nil, "BILLING_SMTP_URL must look like"},
		{"river ui half configured", with("BILLING_RIVERUI_USER", "ops"), nil, "must be set together"},
		{"rps", with("BILLING_STRIPE_RPS", "0"), nil, "BILLING_STRIPE_RPS must be positive"},
		{"log level", with("BILLING_LOG_LEVEL", "loud"), nil, "BILLING_LOG_LEVEL"},
		{"webhook retention under Stripe's retry window", with("BILLING_WEBHOOK_RETENTION", "48h"), nil, "BILLING_WEBHOOK_RETENTION=48h0m0s must be at least 72h"},
		{"webhook retention of a year", with("BILLING_WEBHOOK_RETENTION", "8760h"), nil, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg, _ := parse(t, tc.env, tc.args...)
			err := cfg.Validate(all)
			if tc.want == "" {
				require.NoError(t, err)
				return
			}
			require.ErrorContains(t, err, tc.want)
			for _, s := range []string{"sk_live_abc", "whsec_abc", "pw@"} {
				require.NotContains(t, err.Error(), s, "a secret in an error")
			}
		})
	}
}

func TestFlagWinsOverEnvironment(t *testing.T) {
	t.Parallel()
	cfg, _ := parse(t, with("BILLING_MAX_WORKERS", "7"), "-max-workers", "9")
	require.Equal(t, 9, cfg.MaxWorkers)
	cfg, _ = parse(t, with("BILLING_MAX_WORKERS", "7"))
	require.Equal(t, 7, cfg.MaxWorkers)
}

func TestHelpListsEverySettingAndNoSecret(t *testing.T) {
	t.Parallel()
	env := with("BILLING_NOTIFY_SECRET", "hmac-key-123", "BILLING_RIVERUI_PASSWORD", "ui-pass-123", "BILLING_SMTP_URL", "smtp://u:mail-pass@h:25")
	_, help := parse(t, env, "-h")
	for _, secret := range []string{"sk_live_abc", "whsec_abc", "billing:pw", "hmac-key-123", "ui-pass-123", "mail-pass"} {
		require.NotContains(t, help, secret)
	}
	for _, name := range []string{"DATABASE_URL", "STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET", "STRIPE_API_BASE", "BILLING_HTTP_ADDR"} {
		require.Contains(t, help, "$"+name)
	}
	require.Equal(t, strings.Count(help, "\n  -"), strings.Count(help, "($"), "every flag names its environment variable")
}
