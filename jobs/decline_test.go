package jobs

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/config"
)

func TestDeclinePolicyClassify(t *testing.T) {
	t.Parallel()
	p := DefaultDeclinePolicy()
	tests := []struct {
		code, declineCode string
		want              DeclineClass
	}{
		// Stripe's never-retry-automatically codes and the networks' never-approve codes.
		{"card_declined", "lost_card", NeverRetry},
		{"card_declined", "stolen_card", NeverRetry},
		{"card_declined", "pickup_card", NeverRetry},
		{"incorrect_number", "", NeverRetry},
		{"card_declined", "incorrect_number", NeverRetry},
		{"card_declined", "revocation_of_authorization", NeverRetry},
		{"card_declined", "revocation_of_all_authorizations", NeverRetry},
		{"card_declined", "stop_payment_order", NeverRetry},
		{"card_declined", "highest_risk_level", NeverRetry},
		{"card_declined", "fraudulent", NeverRetry},
		{"expired_card", "expired_card", NeverRetry},
		{"expired_card", "", NeverRetry},
		{"incorrect_cvc", "incorrect_cvc", NeverRetry},
		{"authentication_required", "authentication_required", NeverRetry},
		// The error code wins when it forbids a retry, whatever the decline code says.
		{"authentication_required", "insufficient_funds", NeverRetry},
		// Soft declines.
		{"card_declined", "insufficient_funds", RetryLater},
		{"card_declined", "generic_decline", RetryLater},
		{"card_declined", "do_not_honor", RetryLater},
		{"card_declined", "card_velocity_exceeded", RetryLater},
		{"card_declined", "", RetryLater},
		{"processing_error", "processing_error", RetrySoon},
		{"processing_error", "", RetrySoon},
		{"card_declined", "try_again_later", RetrySoon},
		{"card_declined", "issuer_not_available", RetrySoon},
		{"card_declined", "reenter_transaction", RetrySoon},
		// What the policy does not know is not retried.
		{"card_declined", "some_code_from_the_future", NeverRetry},
		{"", "", NeverRetry},
	}
	for _, tt := range tests {
		t.Run(tt.code+"/"+tt.declineCode, func(t *testing.T) {
			require.Equal(t, tt.want, p.Classify(tt.code, tt.declineCode))
		})
	}
}

func TestDeclinePolicyDecide(t *testing.T) {
	t.Parallel()
	p := DefaultDeclinePolicy()
	at := time.Date(2026, 3, 1, 9, 30, 0, 0, time.UTC)
	day := 24 * time.Hour
	tests := []struct {
		name       string
		in         Decline
		wantRetry  bool
		wantAt     time.Time
		wantReason string
	}{
		{"hard decline goes to recovery",
			Decline{Code: "card_declined", DeclineCode: "lost_card", ChargeDeclines: 1, CardDeclines: 1, At: at},
			false, time.Time{}, "declined (lost_card): not retried automatically"},
		{"authentication required goes to recovery",
			Decline{Code: "authentication_required", DeclineCode: "authentication_required", ChargeDeclines: 1, CardDeclines: 1, At: at},
			false, time.Time{}, "declined (authentication_required): not retried automatically"},
		{"first soft decline waits the first calendar step",
			Decline{Code: "card_declined", DeclineCode: "insufficient_funds", ChargeDeclines: 1, CardDeclines: 1, At: at},
			true, at.Add(1 * day), "declined (insufficient_funds): retry 1 of 8 scheduled"},
		{"third soft decline waits the third step",
			Decline{Code: "card_declined", DeclineCode: "insufficient_funds", ChargeDeclines: 3, CardDeclines: 3, At: at},
			true, at.Add(2 * day), "declined (insufficient_funds): retry 3 of 8 scheduled"},
		{"momentary decline uses the quick calendar",
			Decline{Code: "processing_error", DeclineCode: "processing_error", ChargeDeclines: 1, CardDeclines: 1, At: at},
			true, at.Add(time.Hour), "declined (processing_error): retry 1 of 8 scheduled"},
		{"eighth decline still retries (the eighth retry)",
			Decline{Code: "card_declined", DeclineCode: "generic_decline", ChargeDeclines: 8, CardDeclines: 8, At: at},
			true, at.Add(4 * day), "declined (generic_decline): retry 8 of 8 scheduled"},
		{"ninth decline: Stripe's eight retries are spent",
			Decline{Code: "card_declined", DeclineCode: "generic_decline", ChargeDeclines: 9, CardDeclines: 9, At: at},
			false, time.Time{}, "declined (generic_decline): 8 automatic retries spent"},
		{"card at the networks' limit is not retried",
			Decline{Code: "card_declined", DeclineCode: "insufficient_funds", ChargeDeclines: 1, CardDeclines: 15, At: at},
			false, time.Time{}, "declined (insufficient_funds): card declined 15 times in 30 days, the card networks' limit"},
		{"card just under the limit is retried",
			Decline{Code: "card_declined", DeclineCode: "insufficient_funds", ChargeDeclines: 2, CardDeclines: 14, At: at},
			true, at.Add(2 * day), "declined (insufficient_funds): retry 2 of 8 scheduled"},
		{"decline with no code at all",
			Decline{ChargeDeclines: 1, CardDeclines: 1, At: at},
			false, time.Time{}, "declined (unspecified): not retried automatically"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := p.Decide(tt.in)
			require.Equal(t, tt.wantRetry, got.Retry)
			require.Equal(t, tt.wantAt, got.NextAttemptAt)
			require.Equal(t, tt.wantReason, got.Reason)
		})
	}
}

func TestDeclinePolicyFromConfig(t *testing.T) {
	t.Parallel()
	cfg := &config.Config{}
	require.NoError(t, config.NewFlagSet("run", cfg, func(string) string { return "" }).Parse([]string{
		"-decline-max-retries", "2", "-decline-card-limit", "5",
		"-retry-calendar", "2h,5h", "-retry-quick-calendar", "10m",
		"-decline-never-retry", "insufficient_funds", "-decline-retry-soon", "generic_decline, some_new_code",
	}))
	p, err := DeclinePolicyFromConfig(cfg)
	require.NoError(t, err)
	require.Equal(t, NeverRetry, p.Classify("card_declined", "insufficient_funds"))
	require.Equal(t, RetrySoon, p.Classify("card_declined", "generic_decline"))
	require.Equal(t, RetrySoon, p.Classify("card_declined", "some_new_code"))
	require.Equal(t, []time.Duration{2 * time.Hour, 5 * time.Hour}, p.Calendar)

	at := time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)
	got := p.Decide(Decline{Code: "card_declined", DeclineCode: "do_not_honor", ChargeDeclines: 3, CardDeclines: 3, At: at})
	require.False(t, got.Retry, "two retries allowed, the third decline ends them")
	got = p.Decide(Decline{Code: "card_declined", DeclineCode: "do_not_honor", ChargeDeclines: 2, CardDeclines: 5, At: at})
	require.False(t, got.Retry, "card limit of five")
	got = p.Decide(Decline{Code: "card_declined", DeclineCode: "do_not_honor", ChargeDeclines: 2, CardDeclines: 2, At: at})
	require.True(t, got.Retry)
	require.Equal(t, at.Add(5*time.Hour), got.NextAttemptAt)
}

func TestDeclinePolicyValidate(t *testing.T) {
	t.Parallel()
	require.NoError(t, DefaultDeclinePolicy().Validate())
	tests := map[string]func(*DeclinePolicy){
		"more than eight retries":      func(p *DeclinePolicy) { p.MaxRetries = 9 },
		"more than fifteen per card":   func(p *DeclinePolicy) { p.MaxCardDeclines = 16 },
		"short card window":            func(p *DeclinePolicy) { p.CardWindow = 24 * time.Hour },
		"empty calendar":               func(p *DeclinePolicy) { p.Calendar = nil },
		"calendar step under a minute": func(p *DeclinePolicy) { p.QuickCalendar = []time.Duration{time.Second} },
		"unknown class":                func(p *DeclinePolicy) { p.Codes["x"] = "sometimes" },
		"unknown default class":        func(p *DeclinePolicy) { p.Default = "" },
	}
	for name, mutate := range tests {
		t.Run(name, func(t *testing.T) {
			p := DefaultDeclinePolicy()
			mutate(&p)
			require.Error(t, p.Validate())
		})
	}
}

func TestCalendarStep(t *testing.T) {
	t.Parallel()
	cal := []time.Duration{time.Hour, 2 * time.Hour}
	require.Equal(t, time.Hour, calendarStep(cal, 0))
	require.Equal(t, time.Hour, calendarStep(cal, 1))
	require.Equal(t, 2*time.Hour, calendarStep(cal, 2))
	require.Equal(t, 2*time.Hour, calendarStep(cal, 7), "the last step repeats")
	require.Equal(t, 24*time.Hour, calendarStep(nil, 1))
}
