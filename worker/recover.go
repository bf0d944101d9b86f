package worker

import (
	"html/template"
	"net/http"

	"github.com/billingd/billingd/jobs"
)

// recoverPage is the plain page shown when a recovery link does not lead to a payment page.
var recoverPage = template.Must(template.New("recover").Parse(`<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>{{.Title}}</title>
<style>body{font-family:system-ui,sans-serif;max-width:36rem;margin:4rem auto;padding:0 1rem;line-height:1.5;color:#222}</style>
</head>
<body>
<h1>{{.Title}}</h1>
<p>{{.Text}}</p>
</body>
</html>
`))

type pageText struct{ Title, Text string }

// The pages, by what the link led to. None of them says anything about other links.
var (
	pageNotFound = pageText{"This link is not valid",
		"We could not find a payment for this link. Please check that you copied the whole link from your message."}
	pagePaid = pageText{"Already paid",
		"This payment has been received. There is nothing more to do. Thank you."}
	pageCanceled = pageText{"Nothing to pay",
		"This charge was canceled, so there is nothing to pay."}
	pageClosed = pageText{"This link has expired",
		"This payment link is no longer valid. Please contact us if you still wish to pay."}
	pageBusy = pageText{"One moment, please",
		"Your payment page is being prepared. Please reload this page in a few seconds."}
	pageError = pageText{"Something went wrong",
		"We could not open your payment page just now. Please try again in a few minutes."}
	pageDone = pageText{"Thank you",
		"Your payment was received. It may take a minute to show on your account."}
	pageLeft = pageText{"Payment not completed",
		"You left the payment page without paying. You can use the link in your message again at any time."}
)

// recoverLink serves /recover/{token}: a redirect (303) to the open Checkout Session of the
// charge, a fresh session when the last has expired, or a plain page when there is nothing to
// pay (paid, canceled, written off) or the token is unknown. The token is a bearer secret: it
// is never logged, and the pages are not cached and send no Referer.
func (d *Daemon) recoverLink(w http.ResponseWriter, r *http.Request) {
	link, err := jobs.ResolveRecoveryLink(r.Context(), d.deps, d.river, r.PathValue("token"))
	if err != nil {
		d.logger.Error("recovery link failed", "charge_id", link.ChargeID, "error", err)
		writePage(w, http.StatusBadGateway, pageError)
		return
	}
	switch link.Outcome {
	case jobs.LinkRedirect:
		noStore(w)
		http.Redirect(w, r, link.URL, http.StatusSeeOther)
	case jobs.LinkPaid:
		writePage(w, http.StatusOK, pagePaid)
	case jobs.LinkCanceled:
		writePage(w, http.StatusOK, pageCanceled)
	case jobs.LinkClosed:
		writePage(w, http.StatusGone, pageClosed)
	case jobs.LinkBusy:
		w.Header().Set("Retry-After", "2")
		writePage(w, http.StatusServiceUnavailable, pageBusy)
	default:
		writePage(w, http.StatusNotFound, pageNotFound)
	}
}

// recoverDone is the default success URL of recovery sessions.
func (d *Daemon) recoverDone(w http.ResponseWriter, _ *http.Request) {
	writePage(w, http.StatusOK, pageDone)
}

// recoverCanceled is the default cancel URL of recovery sessions.
func (d *Daemon) recoverCanceled(w http.ResponseWriter, _ *http.Request) {
	writePage(w, http.StatusOK, pageLeft)
}

func noStore(w http.ResponseWriter) {
	h := w.Header()
	h.Set("Cache-Control", "no-store")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("X-Robots-Tag", "noindex")
}

func writePage(w http.ResponseWriter, status int, p pageText) {
	noStore(w)
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'")
	w.WriteHeader(status)
	_ = recoverPage.Execute(w, p)
}
