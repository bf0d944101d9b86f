package jobs

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/billingd/billingd/internal/config"
)

func TestComposeRecovery(t *testing.T) {
	t.Parallel()
	both := &config.Config{PublicURL: "https://pay.example.test/", SMTPURL: "smtp://relay", NotifyURL: "https://app.example.test/hook"}
	payBy := time.Date(2026, 3, 14, 9, 0, 0, 0, time.UTC)
	base := recoveryNotice{
		ChargeID: 42, Round: 1, CustomerID: 7, CustomerRef: "cust-7", Email: "ann@example.com",
		Description: "Installment 2 of 6", Reason: "insufficient_funds",
		Link: recoveryLink(both, "TOKEN"), PayBy: payBy,
	}
	for _, tc := range []struct {
		amount   int64
		currency string
		display  string
		decimal  string
	}{
		{5000, "jpy", "¥5,000", "5000"},
		{1099, "usd", "$10.99", "10.99"},
		{1234, "bhd", "BHD 1.234", "1.234"},
	} {
		n := base
		n.Amount, n.Currency = tc.amount, tc.currency
		rows, err := composeRecovery(both, n)
		require.NoError(t, err)
		require.Len(t, rows, 2)
		email, hook := rows[0], rows[1]
		require.Equal(t, channelEmail, email.Channel)
		require.Equal(t, "ann@example.com", email.Recipient)
		require.Equal(t, "Payment needed: "+tc.display+" for Installment 2 of 6", email.Subject)
		require.Contains(t, email.Body, "We could not collect "+tc.display+` for "Installment 2 of 6"`)
		require.Contains(t, email.Body, "https://pay.example.test/recover/TOKEN\n")
		require.Contains(t, email.Body, "14 March 2026")
		require.Equal(t, "recovery:42:1:email", email.DedupeKey)

		require.Equal(t, channelWebhook, hook.Channel)
		require.Equal(t, "cust-7", hook.Recipient)
		require.Equal(t, "recovery:42:1:webhook", hook.DedupeKey)
		require.Equal(t, EventRecoveryRequired, hook.Payload["type"])
		require.Equal(t, tc.amount, hook.Payload["amount"])
		require.Equal(t, tc.display, hook.Payload["amount_display"])
		require.Equal(t, tc.decimal, hook.Payload["amount_decimal"])
		require.Equal(t, "https://pay.example.test/recover/TOKEN", hook.Payload["url"])
		require.Equal(t, "2026-03-14T09:00:00Z", hook.Payload["pay_by"])
	}

	// A reminder has its own subject and dedupe key per reminder number.
	n := base
	n.Amount, n.Currency, n.Reminder = 5000, "jpy", 2
	rows, err := composeRecovery(both, n)
	require.NoError(t, err)
	require.True(t, strings.HasPrefix(rows[0].Subject, "Reminder: Payment needed: ¥5,000"))
	require.Contains(t, rows[0].Body, `¥5,000 for "Installment 2 of 6" is still unpaid`)
	require.Equal(t, "reminder:42:1:2:email", rows[0].DedupeKey)
	require.Equal(t, EventRecoveryReminder, rows[1].Payload["type"])

	// Channels follow the configuration and the customer's address.
	emailOnly := &config.Config{PublicURL: "https://pay.example.test", SMTPURL: "smtp://relay"}
	rows, err = composeRecovery(emailOnly, recoveryNotice{ChargeID: 1, Round: 1, Amount: 1, Currency: "usd", Email: "a@b.c"})
	require.NoError(t, err)
	require.Len(t, rows, 1)
	require.Equal(t, channelEmail, rows[0].Channel)
	rows, err = composeRecovery(emailOnly, recoveryNotice{ChargeID: 1, Round: 1, Amount: 1, Currency: "usd"})
	require.NoError(t, err)
	require.Empty(t, rows, "no address, no email")

	_, err = composeRecovery(both, recoveryNotice{ChargeID: 1, Amount: 1, Currency: "xxx"})
	require.Error(t, err)
}

func TestValidToken(t *testing.T) {
	t.Parallel()
	tok, err := newToken()
	require.NoError(t, err)
	require.True(t, validToken(tok))
	for _, bad := range []string{"", "short", tok + "A", tok[:42] + "/", tok[:42] + "=", "../../etc/passwd" + tok[:27]} {
		require.False(t, validToken(bad), bad)
	}
}
