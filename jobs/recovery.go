package jobs

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
)

// NotifyRecoveryArgs asks for the customer of a failed charge to be told, with a link to pay
// through a Checkout Session in mode=payment. Round counts recovery rounds of the charge, so
// that each round has its own idempotency key and a retried job reuses its round's key.
type NotifyRecoveryArgs struct {
	ChargeID int64 `json:"charge_id"`
	Round    int   `json:"round"`
}

// Kind is the job kind.
func (NotifyRecoveryArgs) Kind() string { return "notify_recovery" }

// InsertOpts puts recovery notifications on the notifications queue.
func (NotifyRecoveryArgs) InsertOpts() river.InsertOpts {
	return river.InsertOpts{Queue: QueueNotifications, MaxAttempts: 20}
}

// startRecoveryQuery opens the charge's recovery if none is open yet. It returns the round only
// when it opened one, so that a second failure of the same charge, or a job run twice, inserts
// no second notification.
const startRecoveryQuery = `
insert into billing.recoveries (charge_id, token, reason)
values ($1, $2, $3)
on conflict (charge_id) do update
    set round = billing.recoveries.round + 1, reason = excluded.reason, status = 'open',
        closed_at = null, opened_at = now()
    where billing.recoveries.status <> 'open'
returning round`

// StartRecoveryTx opens recovery for a charge that failed off-session (a 402, or checks that
// failed before any call) and inserts its notify_recovery job, in the caller's transaction: the
// failure is never recorded without its notification, and never notified twice. It needs a River
// client in ctx (true inside a job; river.ClientFromContext) or passed as client.
func StartRecoveryTx(ctx context.Context, tx pgx.Tx, client *river.Client[pgx.Tx], chargeID int64, reason string) (opened bool, err error) {
	token, err := newToken()
	if err != nil {
		return false, err
	}
	var round int
	err = tx.QueryRow(ctx, startRecoveryQuery, chargeID, token, reason).Scan(&round)
	if err == pgx.ErrNoRows {
		return false, nil // already open: the customer already has a link
	}
	if err != nil {
		return false, fmt.Errorf("open recovery for charge %d: %w", chargeID, err)
	}
	if client == nil {
		client = river.ClientFromContext[pgx.Tx](ctx)
	}
	if _, err := client.InsertTx(ctx, tx, NotifyRecoveryArgs{ChargeID: chargeID, Round: round}, nil); err != nil {
		return false, fmt.Errorf("insert notify_recovery for charge %d: %w", chargeID, err)
	}
	return true, nil
}

// newToken returns an unguessable URL-safe token (256 bits) for a recovery link.
func newToken() (string, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("recovery token: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(b), nil
}
