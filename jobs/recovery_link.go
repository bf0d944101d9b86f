package jobs

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/stripe/stripe-go/v82"
)

// LinkOutcome is what a recovery link (/recover/{token}) leads to.
type LinkOutcome int

const (
	// LinkNotFound: the token is unknown or malformed. Nothing is said about other tokens.
	LinkNotFound LinkOutcome = iota
	// LinkRedirect: the customer is sent to an open Checkout Session (RecoveryLink.URL).
	LinkRedirect
	// LinkPaid: the charge has been paid (automatically or through recovery).
	LinkPaid
	// LinkCanceled: the charge was canceled; nothing is owed.
	LinkCanceled
	// LinkClosed: the recovery window ended (the charge is written off) or recovery closed.
	LinkClosed
	// LinkBusy: a fresh session is being created by a concurrent request; try again shortly.
	LinkBusy
)

// RecoveryLink is the answer to a recovery link.
type RecoveryLink struct {
	Outcome  LinkOutcome
	URL      string // the Checkout Session URL, for LinkRedirect
	ChargeID int64  // 0 for LinkNotFound
}

// validToken reports whether s has the shape of a recovery token (43 characters of unpadded
// base64url, as newToken makes them), so malformed links never reach the database.
func validToken(s string) bool {
	if len(s) != 43 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

// ResolveRecoveryLink decides where a customer's recovery link leads. An open session with time
// left is reused; when the last session has expired (or is about to), it is expired at Stripe and
// a fresh one is created under the next idempotency key of the round, so that concurrent clicks
// get the same new session. A paid, canceled or written-off charge, and an unknown or forged
// token, change nothing. client inserts the jobs that a replaced session may need.
func ResolveRecoveryLink(ctx context.Context, d *Deps, client *river.Client[pgx.Tx], token string) (RecoveryLink, error) {
	if !validToken(token) {
		return RecoveryLink{Outcome: LinkNotFound}, nil
	}
	for try := 0; try < 5; try++ {
		s, found, err := loadRecovery(ctx, d.Pool, recoveryByTokenQuery, token)
		if err != nil {
			return RecoveryLink{}, err
		}
		if !found {
			return RecoveryLink{Outcome: LinkNotFound}, nil
		}
		link := RecoveryLink{ChargeID: s.ChargeID}
		if o, settled := settledOutcome(s, d.Config.RecoveryWindow, time.Now()); settled {
			link.Outcome = o
			return link, nil
		}
		if s.usableSession(time.Now()) {
			link.Outcome, link.URL = LinkRedirect, s.SessionURL
			return link, nil
		}
		if s.SessionStatus == "open" {
			// Expiring soon or already: close it first, so that only one page is ever payable.
			paid, err := closeSession(ctx, d, s.SessionID)
			if err != nil {
				return RecoveryLink{}, err
			}
			if paid != nil {
				if err := recordSessionPaid(ctx, d, client, paid); err != nil {
					return RecoveryLink{}, err
				}
				link.Outcome = LinkPaid
				return link, nil
			}
		}
		seq := s.NextSeq
		cs, key, err := newSession(ctx, d, s, seq)
		if isKeyInUse(err) && try < 3 {
			// A concurrent request is creating this very session; its answer is a moment away.
			time.Sleep(time.Duration(200*(try+1)) * time.Millisecond)
			continue
		}
		if isKeyInUse(err) {
			return RecoveryLink{Outcome: LinkBusy, ChargeID: s.ChargeID}, nil
		}
		var serr *stripe.Error
		if errors.As(err, &serr) && serr.HTTPStatusCode >= 500 && try < 3 {
			continue // the key is spent (newSession moved to the next): try the next one
		}
		if err != nil {
			return RecoveryLink{}, err
		}
		url, usable, err := storeSession(ctx, d, client, s, seq, cs, key)
		if err != nil {
			return RecoveryLink{}, err
		}
		if !usable {
			continue // settled meanwhile: the next pass says how
		}
		link.Outcome, link.URL = LinkRedirect, url
		return link, nil
	}
	return RecoveryLink{Outcome: LinkBusy}, nil
}

// settledOutcome says where a link leads when the charge no longer waits for the customer.
func settledOutcome(s recoveryState, window time.Duration, now time.Time) (LinkOutcome, bool) {
	switch s.ChargeStatus {
	case "succeeded", "recovered":
		return LinkPaid, true
	case "canceled":
		return LinkCanceled, true
	case "uncollectible":
		return LinkClosed, true
	}
	switch {
	case s.Status == "paid":
		return LinkPaid, true
	case s.Status != "open":
		return LinkClosed, true
	case !now.Before(s.OpenedAt.Add(window)):
		return LinkClosed, true // the sweep will write it off
	}
	return 0, false
}

// storeSession records a fresh session in its own transaction.
func storeSession(ctx context.Context, d *Deps, client *river.Client[pgx.Tx], s recoveryState, seq int, cs *stripe.CheckoutSession, key string) (string, bool, error) {
	tx, err := d.Pool.Begin(ctx)
	if err != nil {
		return "", false, fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	url, usable, err := storeSessionTx(ctx, tx, client, s, seq, cs, key)
	if err != nil {
		return "", false, err
	}
	if err := tx.Commit(ctx); err != nil {
		return "", false, fmt.Errorf("commit recovery session of charge %d: %w", s.ChargeID, err)
	}
	return url, usable, nil
}

// isKeyInUse reports Stripe's 409 for an idempotency key whose first request is still running.
func isKeyInUse(err error) bool {
	var serr *stripe.Error
	return errors.As(err, &serr) && serr.HTTPStatusCode == http.StatusConflict
}
