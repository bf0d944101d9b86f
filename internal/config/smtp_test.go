package config_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/config"
)

func TestParseSMTPURL(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		url  string
		want config.SMTPSettings
	}{
		{"smtp://mail.example.com", config.SMTPSettings{Host: "mail.example.com", Port: 587, TLS: "starttls"}},
		{"smtp://u:p%40ss@mail.example.com:2525", config.SMTPSettings{Host: "mail.example.com", Port: 2525, Username: "u", Password: "p@ss", TLS: "starttls"}},
		{"smtp://127.0.0.1:25?starttls=off", config.SMTPSettings{Host: "127.0.0.1", Port: 25, TLS: "off"}},
		{"smtp://relay?starttls=opportunistic", config.SMTPSettings{Host: "relay", Port: 587, TLS: "opportunistic"}},
		{"smtps://u:p@mail.example.com", config.SMTPSettings{Host: "mail.example.com", Port: 465, Username: "u", Password: "p", TLS: "implicit"}},
	} {
		got, err := config.ParseSMTPURL(tc.url)
		require.NoError(t, err, tc.url)
		require.Equal(t, tc.want, got, tc.url)
	}
	for _, bad := range []string{
		"mail.example.com", "http://mail.example.com", "smtp://", "smtp://u:hunter2@host:0",
		"smtp://u:hunter2@host:99999", "smtp://u:hunter2@host?starttls=maybe", "smtps://u:hunter2@host?starttls=off",
		"smtp://u:hunter2@host/path",
	} {
		_, err := config.ParseSMTPURL(bad)
		require.Error(t, err, bad)
		require.NotContains(t, err.Error(), "hunter2", "the password is never echoed")
	}
}

func TestRecoverySettingsValidated(t *testing.T) {
	t.Parallel()
	env := map[string]string{
		"BILLING_RECOVERY_REMINDER_INTERVAL":     "-1h",
		"BILLING_RECOVERY_PLAN_ON_UNCOLLECTIBLE": "cancel",
		"BILLING_RECOVERY_SCHEDULE":              "hourly",
		"BILLING_SMTP_URL":                       "smtp://u:hunter2@host?starttls=maybe",
	}
	cfg := &config.Config{}
	fs := config.NewFlagSet("run", cfg, func(k string) string { return env[k] })
	require.NoError(t, fs.Parse(nil))
	err := cfg.Validate(config.NeedHTTP)
	require.Error(t, err)
	for _, want := range []string{"BILLING_RECOVERY_REMINDER_INTERVAL", "BILLING_RECOVERY_PLAN_ON_UNCOLLECTIBLE", "BILLING_RECOVERY_SCHEDULE", "starttls"} {
		require.ErrorContains(t, err, want)
	}
	require.NotContains(t, err.Error(), "hunter2")

	cfg = &config.Config{}
	fs = config.NewFlagSet("run", cfg, func(string) string { return "" })
	require.NoError(t, fs.Parse(nil))
	require.Equal(t, "pause", cfg.RecoveryPlanOnUncollectible)
	require.Equal(t, "*/10 * * * *", cfg.RecoverySchedule)
	require.NoError(t, cfg.Validate(config.NeedHTTP))
}
